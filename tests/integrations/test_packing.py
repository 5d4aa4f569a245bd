"""Padding-free packing (``padding_free=True``): the packed layout, packed steps equal padded
steps (loss and gradients) for every loss type, one policy forward per step, and the refusals.

Tolerances: packed and padded runs sum the same float32 log-probs in another order and run the
attention over differently shaped (but equivalent) masks, so losses agree to 1e-5 relative and
gradients to 1e-5 relative to their largest entry.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

pytest.importorskip("trl", reason="the trl extra is not installed")

from solopo_kernels.integrations import packing  # noqa: E402
from solopo_kernels.integrations.model_patch import IGNORE_INDEX, patch_solopo_forward  # noqa: E402
from tests import reference  # noqa: E402
from tests.integrations import common  # noqa: E402

REL = 1e-5


# ------------------------------------------------------------------------------------ layout
def test_pack_sequences_worked_example():
    packed = packing.pack_sequences(
        [torch.tensor([5, 6, 7]), torch.tensor([8, 9])],
        [torch.tensor([0, 0, 1]), torch.tensor([0, 1])],
        pad_token_id=0,
    )
    assert packed["packed_input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert packed["packed_position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert packed["packed_completion_mask"].tolist() == [[0, 0, 1, 0, 1]]
    assert packed["packed_sequence_ids"].tolist() == [[0, 0, 0, 1, 1]]
    assert packed["packed_cu_seq_lens"] == [[0, 3, 5]]
    assert packed["packed_max_length"] == [3]


@pytest.mark.parametrize("cap", [None, 60])
def test_sequence_boundaries_equal_what_transformers_derives_from_the_positions(tmp_path, cap):
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    trainer = common.trainer(
        tmp_path, solopo_ra_target="both", padding_free=True, max_packed_length=cap
    )
    batch = common.batch(trainer, [0, 1, 2, 3])
    packs = list(packing.iter_packs(batch))
    assert len(packs) == (1 if cap is None else len(batch["packed_cu_seq_lens"])) and packs
    if cap is not None:
        assert len(packs) > 1
    for sequences in (None, 8):  # all sequences; the short ones only (a reference's prefix)
        for pack in packing.iter_packs(batch, sequences=sequences):
            (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(pack.position_ids)
            assert torch.equal(pack.cu_seq_lens, cu_q) and torch.equal(cu_k, cu_q)
            assert pack.cu_seq_lens.dtype == torch.int32
            assert pack.max_length == int(max_q) == int(max_k)


def test_the_packed_forward_passes_the_boundaries_to_the_model(tmp_path):
    trainer = common.trainer(tmp_path, padding_free=True)
    seen = []

    def record(module, args, kwargs):
        seen.append({k: kwargs.get(k) for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q")})

    hook = trainer.model.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        batch = common.batch(trainer, [0, 1, 2, 3])
        trainer.compute_loss(trainer.model, batch)
    finally:
        hook.remove()
    (pack,) = packing.iter_packs(batch)
    assert len(seen) == 1  # one policy forward (the reference model has its own hooks)
    assert torch.equal(seen[0]["cu_seq_lens_q"], pack.cu_seq_lens)
    assert torch.equal(seen[0]["cu_seq_lens_k"], pack.cu_seq_lens)
    assert seen[0]["max_length_q"] == pack.max_length


def test_dense_mask_packing_on_cuda_warns_with_its_size_and_the_fix(caplog):
    from types import SimpleNamespace

    def model(implementation):
        return SimpleNamespace(config=SimpleNamespace(_attn_implementation=implementation))

    with caplog.at_level("WARNING", logger="solopo_kernels.integrations.packing"):
        packing.warn_dense_packing(model("sdpa"), torch.device("cpu"), None)
        packing.warn_dense_packing(model("flash_attention_2"), torch.device("cuda"), None)
        assert not caplog.records
        packing.warn_dense_packing(model("sdpa"), torch.device("cuda"), 65536)
    (record,) = caplog.records
    message = record.getMessage()
    assert "dense" in message and "4.00 GiB" in message
    assert "attn_implementation='flash_attention_2'" in message


def test_the_trainer_checks_each_packed_models_attention_on_its_device(tmp_path, monkeypatch):
    from solopo_kernels.integrations import trl as trl_integration

    calls = []
    monkeypatch.setattr(
        trl_integration,
        "warn_dense_packing",
        lambda model, device, cap: calls.append((device, cap)),
    )
    trainer = common.trainer(tmp_path, padding_free=True, max_packed_length=512)
    assert calls == [(trainer.args.device, 512)] * 2  # the policy and the reference


def test_a_cap_splits_between_sequences_and_pads_the_shorter_rows():
    ids = [torch.arange(n) + 1 for n in (3, 2, 4, 1)]
    packed = packing.pack_sequences(
        ids, [torch.ones_like(t) for t in ids], pad_token_id=0, max_tokens=5
    )
    assert packed["packed_sequence_ids"].tolist() == [
        [0, 0, 0, 1, 1],
        [2, 2, 2, 2, 3],
    ]
    # A sequence longer than the cap gets a row of its own.
    assert packing.split_into_rows([3, 7, 2], 5) == [[0], [1], [2]]
    assert packing.split_into_rows([3, 7, 2], None) == [[0, 1, 2]]
    packs = list(
        packing.iter_packs(packing.pack_sequences(ids[:3], ids[:3], pad_token_id=0, max_tokens=4))
    )
    assert [p.input_ids.shape[1] for p in packs] == [3, 2, 4]  # padding cut off


def test_iter_packs_keeps_a_prefix_of_the_sequences():
    ids = [torch.arange(n) + 1 for n in (3, 2, 4)]
    packed = packing.pack_sequences(ids, ids, pad_token_id=0)
    (only,) = packing.iter_packs(packed, sequences=2)
    assert only.sequence_ids.tolist() == [[0, 0, 0, 1, 1]]
    assert packing.count_sequences(packed) == 3


def test_empty_or_mismatched_sequences_raise():
    with pytest.raises(ValueError, match="input_ids: sequence 1 is empty"):
        packing.pack_sequences(
            [torch.tensor([1]), torch.tensor([], dtype=torch.long)],
            [torch.tensor([1])] * 2,
            pad_token_id=0,
        )
    with pytest.raises(ValueError, match="one completion mask per sequence"):
        packing.pack_sequences([torch.tensor([1])], [], pad_token_id=0)


def test_collator_packs_the_padded_rows_end_to_end(tmp_path):
    tok = common.tokenizer()
    padded = common.trainer(tmp_path / "padded", tok=tok, solopo_ra_target="both")
    packed = common.trainer(
        tmp_path / "packed", tok=tok, solopo_ra_target="both", padding_free=True
    )
    a, b = common.batch(padded, [0, 1, 2]), common.batch(packed, [0, 1, 2])
    assert set(packing.PACKED_KEYS) <= set(b) and not {"input_ids", "long_input_ids"} & set(b)
    sequences, masks = [], []
    for prefix in ("", "long_"):
        for ids, attention, completion in zip(
            a[prefix + "input_ids"], a[prefix + "attention_mask"], a[prefix + "completion_mask"]
        ):
            sequences.append(ids[attention.bool()])
            masks.append(completion[attention.bool()])
    assert len(sequences) == 12  # 3 pairs: short chosen, short rejected, long chosen, long rejected
    assert b["packed_input_ids"].shape == (1, sum(len(s) for s in sequences))
    assert torch.equal(b["packed_input_ids"][0], torch.cat(sequences))
    assert torch.equal(b["packed_completion_mask"][0], torch.cat(masks))
    assert torch.equal(
        b["packed_position_ids"][0], torch.cat([torch.arange(len(s)) for s in sequences])
    )
    expected_ids = torch.cat([torch.full((len(s),), i) for i, s in enumerate(sequences)])
    assert torch.equal(b["packed_sequence_ids"][0], expected_ids)


# ------------------------------------------------------------------------- packed == padded
def _loss_and_grads(trainer, indices):
    model = trainer.model
    model.train()
    model.zero_grad()
    loss = trainer.compute_loss(model, common.batch(trainer, indices))
    loss.backward()
    named = dict(model.named_parameters())
    grads = {name: p.grad.clone() for name, p in named.items() if p.grad is not None}
    return loss.detach(), grads


def _pair(
    tmp_path, *, loss_type="dpo", ra_target="chosen", packed_overrides=None, peft=False, **overrides
):
    """The same policy/reference in a padded and a packed trainer."""
    tok = common.tokenizer()
    policy, ref = common.model_pair(tok)
    options = dict(
        solopo_loss_type=loss_type,
        solopo_ra_target=ra_target,
        solopo_alpha=1.5,
        beta=0.5,
        gamma=0.3,
    )
    options.update(overrides)
    trainers = []
    for name, extra in (
        ("padded", {}),
        ("packed", {"padding_free": True, **(packed_overrides or {})}),
    ):
        kwargs = dict(
            tok=tok,
            policy=copy.deepcopy(policy),
            ref=copy.deepcopy(ref) if loss_type in ("dpo", "ipo") and not peft else None,
            **options,
            **extra,
        )
        if peft:
            torch.manual_seed(0)  # the same random LoRA initialisation in both trainers
            trainers.append(_peft_trainer(tmp_path / name, kwargs))
        else:
            trainers.append(common.trainer(tmp_path / name, **kwargs))
    return trainers


def _peft_trainer(path, kwargs):
    peft = pytest.importorskip("peft")
    from solopo_kernels.integrations.trl import SoLoPOTrainer

    tok, policy = kwargs.pop("tok"), kwargs.pop("policy")
    kwargs.pop("ref")
    return SoLoPOTrainer(
        model=policy,
        args=common.config(path, **kwargs),
        train_dataset=common.dataset(),
        processing_class=tok,
        peft_config=peft.LoraConfig(
            r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False
        ),
    )


def _assert_same(padded, packed, indices=(0, 1, 2, 3)):
    loss_a, grads_a = _loss_and_grads(padded, list(indices))
    loss_b, grads_b = _loss_and_grads(packed, list(indices))
    reference.assert_close_rel(loss_b, loss_a, REL, "packed loss")
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        reference.assert_close_rel(grads_b[name], grads_a[name], REL, f"packed grad of {name}")
    return loss_a


@pytest.mark.parametrize("ra_target", ["chosen", "both"])
@pytest.mark.parametrize("loss_type", ["dpo", "ipo", "simpo", "orpo", "cpo"])
def test_packed_step_equals_padded_step(tmp_path, loss_type, ra_target):
    padded, packed = _pair(tmp_path, loss_type=loss_type, ra_target=ra_target)
    _assert_same(padded, packed)


def test_packed_equals_padded_with_eager_attention_and_no_long_reference(tmp_path):
    padded, packed = _pair(tmp_path, solopo_ra_use_reference=False)
    for trainer in (padded, packed):
        for model in (trainer.model, trainer.ref_model):
            model.set_attn_implementation("eager")
    _assert_same(padded, packed)


def test_a_token_cap_runs_several_packed_forwards_with_the_same_result(tmp_path):
    padded, packed = _pair(
        tmp_path, loss_type="simpo", ra_target="both", packed_overrides={"max_packed_length": 40}
    )
    batch = common.batch(packed, [0, 1, 2, 3])
    assert batch["packed_input_ids"].shape[0] >= 3
    assert (batch["packed_sequence_ids"] >= 0).sum(-1).max() <= 40 or batch[
        "packed_input_ids"
    ].shape[0] > 1
    _assert_same(padded, packed)


def test_packed_peft_equals_padded_peft(tmp_path):
    padded, packed = _pair(tmp_path, peft=True)
    assert padded.ref_model is None and packed.ref_model is None  # adapter off = reference
    _assert_same(padded, packed)


def test_packed_alpha_zero_is_the_short_pair_only(tmp_path):
    padded, packed = _pair(tmp_path, solopo_alpha=0.0)
    batch = common.batch(packed, [0, 1])
    assert packing.count_sequences(batch) == 4
    _assert_same(padded, packed, indices=(0, 1))


def test_packed_gradient_accumulation_equals_one_padded_batch(tmp_path):
    # 2 x 2 pairs, packed and accumulated, against 4 pairs padded at once (plain SGD: the update is
    # the gradient).
    tok = common.tokenizer()
    policy, ref = common.model_pair(tok)
    updates = []
    for name, batch_size, accumulation, packed in (("big", 4, 1, False), ("acc", 2, 2, True)):
        trainer = common.trainer(
            tmp_path / name,
            tok=tok,
            policy=copy.deepcopy(policy),
            ref=copy.deepcopy(ref),
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            padding_free=packed,
            max_steps=1,
            optim="sgd",
            learning_rate=1.0,
            max_grad_norm=0.0,
        )
        trainer.train()
        updates.append(
            torch.cat(
                [(p - q).flatten() for p, q in zip(trainer.model.parameters(), policy.parameters())]
            )
        )
    assert updates[0].abs().max() > 1e-3
    reference.assert_close_rel(updates[1], updates[0], REL, "packed accumulated update")


def test_packed_precomputed_reference_equals_live(tmp_path):
    tok = common.tokenizer()
    policy, ref = common.model_pair(tok)
    trainers = [
        common.trainer(
            tmp_path / str(pre),
            tok=tok,
            policy=copy.deepcopy(policy),
            ref=copy.deepcopy(ref),
            padding_free=True,
            precompute_ref_log_probs=pre,
            solopo_ra_target="both",
        )  # fmt: skip
        for pre in (False, True)
    ]
    assert "ref_long_rejected_logps" in trainers[1].train_dataset.column_names
    live, pre = (t.compute_loss(t.model, common.batch(t, [0, 1, 2, 3])) for t in trainers)
    # The precompute packs other batches (another summation order): the module tolerance.
    reference.assert_close_rel(pre.detach(), live.detach(), REL, "precomputed vs live")


# ------------------------------------------------------------------------- forwards per step
def _record(calls: list[str], key: str, *_: object) -> None:
    calls.append(key)


def test_one_policy_forward_and_one_reference_forward_per_step(tmp_path):
    counts = {}
    for packed in (False, True):
        trainer = common.trainer(tmp_path / str(packed), padding_free=packed)
        calls: list[str] = []
        hooks = [
            model.model.register_forward_hook(functools.partial(_record, calls, key))
            for key, model in (("policy", trainer.model), ("reference", trainer.ref_model))
        ]
        try:
            trainer.compute_loss(trainer.model, common.batch(trainer, [0, 1, 2, 3]))
        finally:
            for hook in hooks:
                hook.remove()
        counts[packed] = {key: calls.count(key) for key in ("policy", "reference")}
    assert counts[False] == {"policy": 2, "reference": 2}
    assert counts[True] == {"policy": 1, "reference": 1}


# ------------------------------------------------------------------------------ refusals
def test_an_attention_that_could_mix_sequences_is_refused(tmp_path):
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register("solopo_test_custom", sdpa_attention_forward)
    tok = common.tokenizer()
    policy, ref = common.model_pair(tok)
    policy.set_attn_implementation("solopo_test_custom")
    with pytest.raises(
        ValueError, match="padding_free: the model's attn_implementation='solopo_test_custom'"
    ):
        common.trainer(tmp_path, tok=tok, policy=policy, ref=ref, padding_free=True)
    common.trainer(tmp_path, tok=tok, policy=policy, ref=ref)  # padded: any attention is fine


def test_a_collator_that_does_not_pack_is_refused(tmp_path):
    from solopo_kernels.integrations.trl import DataCollatorForSoLoPO, SoLoPOTrainer

    tok = common.tokenizer()
    policy, ref = common.model_pair(tok)
    with pytest.raises(
        ValueError,
        match=r"data_collator: DataCollatorForSoLoPO.padding_free=False does not match the "
        r"trainer's padding_free=True",
    ):
        SoLoPOTrainer(
            model=policy,
            ref_model=ref,
            args=common.config(tmp_path, padding_free=True),
            data_collator=DataCollatorForSoLoPO(pad_token_id=tok.pad_token_id),
            train_dataset=common.dataset(),
            processing_class=tok,
        )


@pytest.mark.parametrize(
    ("collator_fields", "options", "message"),
    [
        (
            {"long_rows": "chosen", "padding_free": True},
            {"solopo_ra_target": "both", "padding_free": True},
            r"long_rows='chosen' does not match the trainer's solopo_ra_target='both'",
        ),
        (
            {"include_long": True},
            {"solopo_alpha": 0.0},
            r"include_long=True does not match the trainer's solopo_alpha=0.0",
        ),
        (
            {"padding_free": True},
            {},
            r"padding_free=True does not match the trainer's padding_free=False",
        ),
    ],
    ids=["long_rows", "include_long", "packs"],
)
def test_a_collator_built_for_other_options_is_refused_at_construction(
    tmp_path, collator_fields, options, message
):
    from solopo_kernels.integrations.trl import DataCollatorForSoLoPO, SoLoPOTrainer

    tok = common.tokenizer()
    policy, ref = common.model_pair(tok)
    with pytest.raises(ValueError, match=r"data_collator: DataCollatorForSoLoPO\." + message):
        SoLoPOTrainer(
            model=policy,
            ref_model=ref,
            args=common.config(tmp_path, **options),
            data_collator=DataCollatorForSoLoPO(pad_token_id=tok.pad_token_id, **collator_fields),
            train_dataset=common.dataset(),
            processing_class=tok,
        )


def test_a_packed_batch_of_other_long_rows_is_refused_in_the_step(tmp_path):
    """4 pairs packed with one long row each are 12 sequences, which also reads as 3 pairs of
    ra_target="both" (2 + 2 per pair): the step must not split them that way."""
    from solopo_kernels.integrations.trl import DataCollatorForSoLoPO

    tok = common.tokenizer()
    policy, ref = common.model_pair(tok)
    trainer = common.trainer(
        tmp_path, tok=tok, policy=policy, ref=ref, solopo_ra_target="both", padding_free=True
    )
    chosen_only = DataCollatorForSoLoPO(
        pad_token_id=tok.pad_token_id, long_rows="chosen", padding_free=True
    )
    batch = chosen_only([trainer.train_dataset[i] for i in range(4)])
    with pytest.raises(
        ValueError,
        match=r"n_sequences=12 for n_pairs=4, expected \(2 \+ 2\) \* n_pairs = 16",
    ):
        trainer.compute_loss(trainer.model, batch)


@pytest.mark.parametrize("value", [1, 0, 2.5, True])
def test_max_packed_length_is_checked(tmp_path, value):
    with pytest.raises(ValueError, match="max_packed_length"):
        common.config(tmp_path, padding_free=True, max_packed_length=value)


def test_the_boundary_between_packed_sequences_is_never_scored():
    # Two sequences whose second one is marked a response from its very first token: the padded
    # layout cannot score that first token (nothing precedes it in its row), and neither may the
    # packed row (its "predecessor" is the last token of the other sequence).
    tok = common.tokenizer()
    model = patch_solopo_forward(common.model_pair(tok)[0])
    a, b = torch.tensor([5, 6, 7, 8]), torch.tensor([9, 10, 11])
    packed = packing.pack_sequences(
        [a, b], [torch.tensor([0, 0, 1, 1]), torch.tensor([1, 1, 1])], pad_token_id=0
    )
    pack = next(packing.iter_packs(packed))
    labels = pack.input_ids.masked_fill(pack.completion_mask == 0, IGNORE_INDEX)
    out = model(
        input_ids=pack.input_ids, position_ids=pack.position_ids, solopo_labels=labels,
        solopo_sequence_ids=pack.sequence_ids,
    )  # fmt: skip
    assert out.lengths.tolist() == [2, 2]
    for i, (ids, labels_row) in enumerate(((a, [-100, -100, 7, 8]), (b, [9, 10, 11]))):
        alone = model(input_ids=ids[None], solopo_labels=torch.tensor([labels_row]))
        reference.assert_close_rel(out.logps[i], alone.logps[0], REL, f"sequence {i}")


# ------------------------------------------------------------------------------ CUDA only
def _flash_attention_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(
    not _flash_attention_available(), reason="needs CUDA and the flash-attn package"
)
def test_packed_equals_padded_with_flash_attention_2(tmp_path):
    # flash-attn's varlen kernels on the packed row (the boundaries come from position_ids)
    # against its padded path (unpadded by the attention mask); bf16 weights, so 1e-2.
    padded, packed = _pair(tmp_path, loss_type="simpo", ra_target="both", bf16=True, use_cpu=False)
    for trainer in (padded, packed):
        trainer.model.to(device="cuda", dtype=torch.bfloat16)
        trainer.model.set_attn_implementation("flash_attention_2")
    check = packing.attention_implementation(packed.model)
    assert check == "flash_attention_2"
    loss_a, grads_a = _loss_and_grads(padded, [0, 1, 2, 3])
    loss_b, grads_b = _loss_and_grads(packed, [0, 1, 2, 3])
    reference.assert_close_rel(loss_b, loss_a, 1e-2, "packed loss (flash-attn)")
    for name in grads_a:
        reference.assert_close_rel(grads_b[name], grads_a[name], 1e-2, f"grad of {name}")
