"""LLaMA-Factory's DPO stage through solopo_kernels' launcher (solopo_kernels.integrations.llamafactory).

Runs in its own virtualenv (LLaMA-Factory 0.9.5 pins older TRL and transformers; see .ci/run),
skipped elsewhere. Each training test runs one step of LLaMA-Factory's own workflow (``run_exp``:
its parser, tokenizer and model loading, ``default`` template, dataset registered in a temporary
``dataset_info.json``, ``run_dpo``) on a tiny Llama and word-level tokenizer saved to disk:

* ``solopo_alpha: 0``: loss, grad norm, every metric and the weights after the step equal
  LLaMA-Factory's unpatched run, for sigmoid (also with ``pref_ftx`` and label smoothing), ipo,
  orpo and simpo; the kernel ran and no ``[tokens x vocab]`` logits were made;
* ``solopo_alpha > 0``: loss and grad norm equal a float64 computation written here from the
  materialized logits (LLaMA-Factory's formulas + alpha x SoLo-RA), tolerance 1e-5 relative;
* precomputed reference log-probs give the same step, with the reference model released;
* peak memory of a step at a long context is below the unpatched run's;
* the data path (sharegpt, a mapped long-prompt column, ``solopo_cutoff_long_len``), the CLI
  with a YAML file, and every refusal with its message.
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("llamafactory")
pytestmark = [pytest.mark.llamafactory, pytest.mark.timeout(600)]

from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402

from solopo_kernels.integrations import model_patch  # noqa: E402
from solopo_kernels.integrations.llamafactory import run_exp  # noqa: E402
from solopo_kernels.integrations.llamafactory import trainer as lf_trainer  # noqa: E402
from solopo_kernels.tiny_models import tiny_llama, tiny_tokenizer  # noqa: E402
from tests.instruments import AllocationRecorder  # noqa: E402

WORDS = (
    "the a red blue green key box mat cup bag cat dog sat is in on under where what color "
    "of kitchen garden shelf door note says far away ran old human assistant system"
).split()

# (question, long prompt, chosen, rejected): the long prompt is the question after filler text.
ROWS = [
    (
        "the red key is in the box . where is the red key ?",
        "the dog ran far away . the red key is in the box . the old cat sat on the mat . where is the red key ?",
        "in the box",
        "on the mat under the door",
    ),
    (
        "the blue cup is on the shelf . where is the blue cup ?",
        "a note says the green bag is under the door . the blue cup is on the shelf . the dog ran in the garden . where is the blue cup ?",
        "on the shelf",
        "in the kitchen",
    ),
]


def _save_model(path: Path, tokenizer: Any, *, seed: int, scale: float = 20.0) -> Any:
    """A tiny Llama whose lm_head is scaled up, so that token log-probs differ (a freshly
    initialised head gives nearly uniform ones, and every reward would be ~0)."""
    model = tiny_llama(tokenizer, seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("llamafactory")
    tokenizer = tiny_tokenizer(WORDS)
    policy = _save_model(root / "policy", tokenizer, seed=0)
    reference = copy.deepcopy(policy)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(
                0.3 * parameter.std() * torch.randn(parameter.shape, generator=generator)
            )
    reference.save_pretrained(root / "reference")
    tokenizer.save_pretrained(root / "reference")
    data = root / "data"
    data.mkdir()
    alpaca = [
        {"instruction": q, "chosen": c, "rejected": r, "long_prompt": lp} for q, lp, c, r in ROWS
    ]
    (data / "pairs.json").write_text(json.dumps(alpaca))
    sharegpt = [
        {
            "conversations": [{"from": "human", "value": q}],
            "chosen": {"from": "gpt", "value": c},
            "rejected": {"from": "gpt", "value": r},
            "context_long": lp,
        }
        for q, lp, c, r in ROWS
    ]
    (data / "chat.json").write_text(json.dumps(sharegpt))
    info = {
        "pairs": {
            "file_name": "pairs.json",
            "ranking": True,
            "columns": {"prompt": "instruction", "chosen": "chosen", "rejected": "rejected"},
        },
        "chat": {
            "file_name": "chat.json",
            "ranking": True,
            "formatting": "sharegpt",
            "columns": {
                "messages": "conversations",
                "chosen": "chosen",
                "rejected": "rejected",
                "long_prompt": "context_long",
            },
        },
    }
    (data / "dataset_info.json").write_text(json.dumps(info))
    os.environ["HF_DATASETS_CACHE"] = str(root / "datasets_cache")
    return root


def _args(workdir: Path, name: str, **overrides: Any) -> dict[str, Any]:
    """A one-step DPO run on both examples (one batch), full fine-tuning, float32 on the CPU."""
    args = {
        "stage": "dpo",
        "do_train": True,
        "model_name_or_path": str(workdir / "policy"),
        "ref_model": str(workdir / "reference"),
        "finetuning_type": "full",
        "template": "default",
        "dataset": "pairs",
        "dataset_dir": str(workdir / "data"),
        "cutoff_len": 512,
        "overwrite_cache": True,
        "output_dir": str(workdir / "runs" / name),
        "overwrite_output_dir": True,
        "per_device_train_batch_size": 2,
        "max_steps": 1,
        "learning_rate": 1e-2,
        # SGD: the update is lr x the gradient (Adam's first step is lr x its sign, which turns
        # float32 rounding in near-zero gradients into differences of up to lr).
        "optim": "sgd",
        "logging_steps": 1,
        "report_to": "none",
        "save_strategy": "no",
        "pref_beta": 0.1,
    }
    args.update(overrides)
    return args


class _Logs(TrainerCallback):
    """The training logs of the run (loss, grad_norm, the trainer's metrics) and the evaluation
    logs (eval_loss, ...)."""

    def __init__(self) -> None:
        self.logs: list[dict[str, float]] = []
        self.eval_logs: list[dict[str, float]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
        if logs and "loss" in logs:
            self.logs.append(dict(logs))
        elif logs and "eval_loss" in logs:
            self.eval_logs.append(dict(logs))


def _run(
    args: dict[str, Any],
    *,
    patched: bool,
    callbacks: list[Any] | None = None,
    logs: _Logs | None = None,
) -> dict[str, float]:
    """One run of LLaMA-Factory's ``run_exp`` (``patched``: through solopo_kernels' launcher);
    returns the log of its single training step."""
    from llamafactory.train.tuner import run_exp as llamafactory_run_exp

    logs = logs or _Logs()
    (run_exp if patched else llamafactory_run_exp)(args, [logs, *(callbacks or [])])
    assert len(logs.logs) == 1
    return logs.logs[0]


def _weights(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


class _KernelCalls:
    """Counts the fused kernel's calls, the rows it scored and their dtype (patched into
    model_patch)."""

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.dtypes: list[torch.dtype] = []
        self._kernel = model_patch.response_logprobs

    def __call__(self, rows: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.rows.append(rows.shape[0])
        self.dtypes.append(rows.dtype)
        return self._kernel(rows, *args, **kwargs)


# ------------------------------------------------------------------ alpha = 0: LLaMA-Factory's numbers
@pytest.mark.parametrize(
    "options",
    [
        {"pref_loss": "sigmoid", "pref_ftx": 0.5, "dpo_label_smoothing": 0.1},
        {"pref_loss": "ipo"},
        {"pref_loss": "orpo", "pref_beta": 0.2},
        {"pref_loss": "simpo", "pref_beta": 2.0, "simpo_gamma": 0.3},
    ],
    ids=["sigmoid-ftx-smoothing", "ipo", "orpo", "simpo"],
)
def test_fused_head_gives_llamafactorys_loss_metrics_and_update(workdir, options):
    name = "-".join(f"{k}{v}" for k, v in options.items())
    theirs = _run(_args(workdir, f"lf-{name}", **options), patched=False)
    calls = _KernelCalls()
    with mock.patch.object(model_patch, "response_logprobs", calls):
        ours = _run(_args(workdir, f"ours-{name}", **options, solopo_alpha=0.0), patched=True)
    # The kernel scored the response tokens only (policy and, for sigmoid/ipo, the reference).
    n_response = sum(len(c.split()) + len(r.split()) + 2 for _, _, c, r in ROWS)  # + </s> each
    uses_reference = options["pref_loss"] in ("sigmoid", "ipo")
    assert calls.rows == [n_response] * (2 if uses_reference else 1)
    assert set(ours) == set(theirs)
    assert abs(theirs["rewards/margins"]) > 1e-3 or not uses_reference  # a non-trivial step
    worst = max(theirs, key=lambda k: abs(ours[k] - theirs[k]) / max(abs(theirs[k]), 1e-12))
    print(
        f"{name}: loss {ours['loss']:.8g} vs LLaMA-Factory {theirs['loss']:.8g}; largest relative "
        f"difference over {len(theirs)} logged values: {worst} "
        f"{abs(ours[worst] - theirs[worst]) / max(abs(theirs[worst]), 1e-12):.1e}"
    )
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    before = _weights(str(workdir / "policy"))
    mine = _weights(str(workdir / "runs" / f"ours-{name}"))
    for key, value in _weights(str(workdir / "runs" / f"lf-{name}")).items():
        assert not torch.equal(value, before[key]), key  # the step moved every weight
        torch.testing.assert_close(
            mine[key] - before[key], value - before[key], rtol=1e-4, atol=1e-8, msg=key
        )


def test_bf16_fused_head_is_as_close_to_float64_as_llamafactorys(workdir):
    """``bf16: true`` (autocast on the CPU, as LLaMA-Factory trains on GPUs): LLaMA-Factory rounds
    the logits to bf16; the fused head rounds only its inputs and accumulates in float32. Both
    runs' ``logps/chosen`` (mean summed log-prob of the chosen responses under the initial
    policy) against the float64 value: the fused head's error is at most LLaMA-Factory's (plus
    1e-3 absolute), and the losses agree to bf16 precision."""
    options = {"pref_loss": "sigmoid", "bf16": True, "use_cpu": True}
    theirs = _run(_args(workdir, "bf16-lf", **options), patched=False)
    calls = _KernelCalls()
    with mock.patch.object(model_patch, "response_logprobs", calls):
        ours = _run(_args(workdir, "bf16-ours", **options, solopo_alpha=0.0), patched=True)
    assert calls.dtypes == [torch.bfloat16, torch.bfloat16]  # the policy and reference, in autocast
    tokenizer = AutoTokenizer.from_pretrained(workdir / "policy")
    policy = AutoModelForCausalLM.from_pretrained(workdir / "policy", dtype=torch.float64)
    with torch.no_grad():
        truth = sum(_logp(policy, *_rows(tokenizer, q, c))[0].item() for q, _, c, _ in ROWS) / len(
            ROWS
        )
    their_error = abs(theirs["logps/chosen"] - truth)
    our_error = abs(ours["logps/chosen"] - truth)
    print(
        f"bf16 logps/chosen error vs float64: LLaMA-Factory {their_error:.2e}, fused {our_error:.2e}"
    )
    assert our_error <= their_error + 1e-3
    assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-2)
    assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=5e-2)


# ------------------------------------------------------------------ alpha > 0: a float64 hand computation
def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _rows(tokenizer: Any, prompt: str, response: str) -> tuple[list[int], int]:
    """LLaMA-Factory's ``default`` template written out: ``Human: {prompt}</s>\\nAssistant:`` then
    ``{response}</s>\\n``; returns the ids and the number of prompt tokens."""
    eos = tokenizer.eos_token_id
    prompt_ids = _encode(tokenizer, "Human: " + prompt) + [eos] + _encode(tokenizer, "\nAssistant:")
    return prompt_ids + _encode(tokenizer, response) + [eos], len(prompt_ids)


def _logp(model: Any, ids: list[int], n_prompt: int) -> tuple[torch.Tensor, int]:
    """Sum of the response tokens' log-probs from the full float64 logits, and their count."""
    tensor = torch.tensor([ids])
    logits = model(input_ids=tensor).logits[0, :-1].double()
    token_logps = logits.log_softmax(-1).gather(-1, tensor[0, 1:, None])[:, 0]
    return token_logps[n_prompt - 1 :].sum(), len(ids) - n_prompt


def _reward(loss_type: str, beta: float, logp, n, ref_logp):  # noqa: ANN001, ANN202
    """SoLo-RA's reward (docs/objective.md): dpo beta*(logp - ref), ipo beta*(mean - ref mean),
    simpo beta*mean, orpo the log-odds of the mean."""
    if loss_type == "sigmoid":
        return beta * (logp - ref_logp)
    if loss_type == "ipo":
        return beta * (logp - ref_logp) / n
    if loss_type == "simpo":
        return beta * logp / n
    mean = logp / n
    return mean - torch.log1p(-torch.exp(mean))


def _hand_loss(tokenizer, policy, reference, options: dict[str, Any]) -> torch.Tensor:  # noqa: ANN001
    """LLaMA-Factory's per-pair loss for ``pref_loss`` (its trainer.py and TRL 0.24's dpo_loss),
    averaged, plus alpha x the mean SoLo-RA distance, all in float64."""
    loss_type, beta, alpha = options["pref_loss"], options["pref_beta"], options["solopo_alpha"]
    gamma = options.get("simpo_gamma", 0.5)
    target = options.get("solopo_ra_target", "chosen")
    squared = options.get("solopo_ra_distance", "abs") == "squared"
    use_ref = options.get("solopo_ra_use_reference", True)
    detach_short = options.get("solopo_ra_gradient", "both") == "long"
    averaged = loss_type in ("ipo", "orpo", "simpo")
    preference, alignment = [], []
    for question, long_prompt, chosen, rejected in ROWS:
        seq = {}
        for key, (prompt, response) in {
            "c": (question, chosen),
            "r": (question, rejected),
            "lc": (long_prompt, chosen),
            "lr": (long_prompt, rejected),
        }.items():
            ids, n_prompt = _rows(tokenizer, prompt, response)
            logp, n = _logp(policy, ids, n_prompt)
            with torch.no_grad():
                ref_logp, _ = _logp(reference, ids, n_prompt)
            seq[key] = (logp, n, ref_logp)
        (c, nc, rc), (r, nr, rr) = seq["c"], seq["r"]
        if averaged:
            c, r, rc, rr = c / nc, r / nr, rc / nc, rr / nr
        if loss_type in ("sigmoid", "ipo"):
            # ipo too: LLaMA-Factory 0.9.5 calls TRL 0.24's dpo_loss without loss_type, which
            # defaults to "sigmoid", so its ipo is the sigmoid loss on mean log-probs.
            preference.append(-F.logsigmoid(beta * ((c - rc) - (r - rr))))
        elif loss_type == "orpo":
            log_odds = (c - r) - (torch.log1p(-torch.exp(c)) - torch.log1p(-torch.exp(r)))
            preference.append(-c - beta * F.logsigmoid(log_odds))
        else:
            preference.append(-F.logsigmoid(beta * (c - r) - gamma))
        distance = 0.0
        for short, long in (("c", "lc"), ("r", "lr"))[: 2 if target == "both" else 1]:
            (s, ns, rs), (lg, nl, rl) = seq[short], seq[long]
            short_reward = _reward(loss_type, beta, s, ns, rs if use_ref else 0.0)
            if detach_short:
                short_reward = short_reward.detach()
            gap = short_reward - _reward(loss_type, beta, lg, nl, rl if use_ref else 0.0)
            distance = distance + (gap**2 if squared else gap.abs())
        alignment.append(distance)
    return torch.stack(preference).mean() + alpha * torch.stack(alignment).mean()


@pytest.mark.parametrize(
    "options",
    [
        {"pref_loss": "sigmoid", "solopo_alpha": 0.7},
        {
            "pref_loss": "ipo",
            "solopo_alpha": 0.5,
            "solopo_ra_target": "both",
            "solopo_ra_distance": "squared",
            "solopo_ra_use_reference": False,
        },
        {"pref_loss": "orpo", "pref_beta": 0.2, "solopo_alpha": 1.0},
        {
            "pref_loss": "simpo",
            "pref_beta": 2.0,
            "simpo_gamma": 0.3,
            "solopo_alpha": 2.0,
            "solopo_ra_gradient": "long",
        },
    ],
    ids=["sigmoid", "ipo-both-squared-no-ref", "orpo", "simpo-long-gradient"],
)
def test_solopo_step_equals_a_float64_hand_computation(workdir, options):
    options = {"pref_beta": 0.1, **options}
    ours = _run(_args(workdir, "solopo", **options), patched=True)
    tokenizer = AutoTokenizer.from_pretrained(workdir / "policy")
    policy = AutoModelForCausalLM.from_pretrained(workdir / "policy", dtype=torch.float64)
    reference = AutoModelForCausalLM.from_pretrained(workdir / "reference", dtype=torch.float64)
    loss = _hand_loss(tokenizer, policy, reference, options)
    loss.backward()
    grad_norm = torch.sqrt(
        sum(p.grad.square().sum() for p in policy.parameters() if p.grad is not None)
    )
    print(
        f"{options}: loss {ours['loss']:.8g} vs float64 {loss.item():.8g} (relative "
        f"{abs(ours['loss'] - loss.item()) / loss.item():.1e}); grad norm {ours['grad_norm']:.8g} "
        f"vs {grad_norm.item():.8g} ({abs(ours['grad_norm'] - grad_norm.item()) / grad_norm.item():.1e})"
    )
    assert ours["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert ours["grad_norm"] == pytest.approx(grad_norm.item(), rel=1e-5)
    assert ours["solo_ra/alignment_loss"] > 0


def test_precomputed_reference_gives_the_same_step_and_releases_the_reference(workdir):
    """Train and evaluation (``do_eval`` on an eval dataset: LLaMA-Factory's evaluate after
    training) with the reference run every step and precomputed once: the same numbers."""
    options = {
        "pref_loss": "sigmoid",
        "solopo_alpha": 0.7,
        "solopo_ra_target": "both",
        "do_eval": True,
        "eval_dataset": "pairs",
        "per_device_eval_batch_size": 2,
    }
    every_step_logs, once_logs = _Logs(), _Logs()
    every_step = _run(
        _args(workdir, "refs-every-step", **options), patched=True, logs=every_step_logs
    )
    seen = []
    precompute = lf_trainer.SoLoPODPOTrainer._precompute_references

    def spy(self):  # noqa: ANN001, ANN202
        reference = self.ref_model
        precompute(self)
        seen.append((self.ref_model, self.train_dataset.column_names))
        seen.append(all(p.is_meta for p in reference.parameters()))  # its weights were freed

    with mock.patch.object(lf_trainer.SoLoPODPOTrainer, "_precompute_references", spy):
        once = _run(
            _args(workdir, "refs-once", **options, solopo_precompute_ref_log_probs=True),
            patched=True,
            logs=once_logs,
        )
    [(ref_model, columns), freed] = seen
    assert ref_model is None and freed
    assert {"ref_chosen_logps", "ref_long_rejected_logps"} <= set(columns)
    for key, value in every_step.items():
        assert once[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    [evaluated], [evaluated_once] = every_step_logs.eval_logs, once_logs.eval_logs
    assert evaluated["eval_solo_ra/alignment_loss"] > 0
    for key in ("eval_loss", "eval_rewards/margins", "eval_solo_ra/alignment_loss"):
        assert evaluated_once[key] == pytest.approx(evaluated[key], rel=1e-5), key


def test_lora_runs_on_the_fused_head_with_the_adapter_disabled_as_reference(workdir):
    """LoRA without a ref_model: LLaMA-Factory's reference is the policy with its adapter
    disabled. alpha = 0 equals LLaMA-Factory's run (loss, grad norm, metrics, adapter update);
    alpha > 0 scores the long rows with the adapter disabled too (the adapter starts at zero, so
    the policy is its own reference: every reward and the SoLo-RA distance are 0)."""
    options = {"finetuning_type": "lora", "lora_target": "all", "ref_model": None}
    theirs = _run(_args(workdir, "lora-lf", **options), patched=False)
    ours = _run(_args(workdir, "lora-ours", **options, solopo_alpha=0.0), patched=True)
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert theirs["grad_norm"] > 0
    from safetensors.torch import load_file

    adapters = [
        load_file(str(workdir / "runs" / name / "adapter_model.safetensors"))
        for name in ("lora-ours", "lora-lf")
    ]
    for key, value in adapters[1].items():
        torch.testing.assert_close(adapters[0][key], value, rtol=1e-4, atol=1e-8, msg=key)
    solopo = _run(_args(workdir, "lora-solopo", **options, solopo_alpha=1.0), patched=True)
    assert solopo["solo_ra/alignment_loss"] == 0.0 and solopo["rewards/margins"] == 0.0
    assert solopo["loss"] == pytest.approx(math.log(2), rel=1e-6)


# ------------------------------------------------------------------ memory at a long context
class _StepAllocations(TrainerCallback):
    """Records every allocation of the first training step (forward, backward, optimizer)."""

    def __init__(self) -> None:
        self.recorder = AllocationRecorder()

    def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        self.recorder.__enter__()

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        self.recorder.__exit__(None, None, None)


def test_peak_memory_of_a_long_context_step_is_below_llamafactorys(tmp_path):
    """A 2,000-token prompt and a 4,000-word vocabulary (hidden size 32): LLaMA-Factory's step
    holds float32 [2, T, V] logits and their log-softmax; the fused head scores the response rows
    only."""
    words = [f"w{i}" for i in range(4000)] + ["human", "assistant"]
    tokenizer = tiny_tokenizer(words)
    _save_model(tmp_path / "policy", tokenizer, seed=0, scale=1.0)
    vocab = len(tokenizer)
    generator = torch.Generator().manual_seed(0)
    prompt = " ".join(words[i] for i in torch.randint(0, 4000, (2000,), generator=generator))
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"instruction": prompt, "chosen": "w1 w2 w3", "rejected": "w4 w5"}]
    (data / "long.json").write_text(json.dumps(rows))
    (data / "dataset_info.json").write_text(
        json.dumps(
            {
                "long": {
                    "file_name": "long.json",
                    "ranking": True,
                    "columns": {
                        "prompt": "instruction",
                        "chosen": "chosen",
                        "rejected": "rejected",
                    },
                }
            }
        )
    )
    os.environ["HF_DATASETS_CACHE"] = str(tmp_path / "datasets_cache")
    args = _args(
        tmp_path,
        "memory",
        model_name_or_path=str(tmp_path / "policy"),
        ref_model=None,
        pref_loss="simpo",  # no reference model: the step's own head only
        dataset="long",
        dataset_dir=str(data),
        cutoff_len=4096,
        per_device_train_batch_size=1,
    )
    peaks, largest = {}, {}
    for patched in (False, True):
        step = _StepAllocations()
        _run(
            dict(args, **({"solopo_alpha": 0.0} if patched else {})),
            patched=patched,
            callbacks=[step],
        )
        peaks[patched] = step.recorder.peak_live_bytes
        largest[patched] = max(
            (
                math.prod(shape)
                for _, _, shape in step.recorder.allocations
                if shape and shape[-1] == vocab
            ),
            default=0,
        )
    tokens = 2 * 2010  # two rows of ~2,010 tokens
    print(
        f"peak live bytes of the step: LLaMA-Factory {peaks[False]:,}, fused head {peaks[True]:,}"
    )
    assert largest[False] >= tokens * vocab  # the instrument sees LLaMA-Factory's logits
    assert largest[True] < 64 * vocab  # the fused head: response rows (and tiles) only
    logits_bytes = 4 * tokens * vocab
    assert peaks[True] < peaks[False] - logits_bytes  # at least one float32 [2, T, V] saved


# ------------------------------------------------------------------ data path
def _pairwise_dataset(workdir: Path, **overrides: Any) -> tuple[Any, Any]:
    """LLaMA-Factory's own dataset loading (``get_dataset``, stage ``rm`` as ``run_dpo`` calls it)
    under the launcher's patches; returns the train dataset and the tokenizer."""
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    from solopo_kernels.integrations.llamafactory import patched, split_solopo_args

    lf_args, solopo = split_solopo_args(_args(workdir, "data", **overrides))
    with patched(solopo):
        model_args, data_args, training_args, _, _ = get_train_args(lf_args)
        tokenizer_module = load_tokenizer(model_args)
        template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
        module = get_dataset(
            template, model_args, data_args, training_args, stage="rm", **tokenizer_module
        )
    return module["train_dataset"], tokenizer_module["tokenizer"]


def test_sharegpt_long_prompt_from_a_mapped_column_uses_the_same_template(workdir):
    dataset, tokenizer = _pairwise_dataset(
        workdir, dataset="chat", solopo_alpha=1.0, solopo_ra_target="both"
    )
    for example, (_, long_prompt, chosen, rejected) in zip(dataset, ROWS):
        for side, response in (("chosen", chosen), ("rejected", rejected)):
            ids, n_prompt = _rows(tokenizer, long_prompt, response)
            assert example[f"long_{side}_input_ids"] == ids
            assert example[f"long_{side}_labels"] == [-100] * n_prompt + ids[n_prompt:]
            assert example[f"long_{side}_attention_mask"] == [1] * len(ids)


def test_cutoff_long_len_cuts_the_long_prompt_from_the_left(workdir):
    dataset, tokenizer = _pairwise_dataset(workdir, solopo_alpha=1.0, solopo_cutoff_long_len=12)
    for example, (_, long_prompt, chosen, _) in zip(dataset, ROWS):
        ids, n_prompt = _rows(tokenizer, long_prompt, chosen)
        assert example["long_chosen_input_ids"] == ids[-12:]
        assert example["long_chosen_labels"][-(len(ids) - n_prompt) :] == ids[n_prompt:]
        assert "long_rejected_input_ids" not in example


def test_a_missing_long_prompt_column_names_the_fix(workdir):
    with pytest.raises(
        ValueError, match=r"long_prompt: dataset 'chat.json' has no column 'long_prompt'"
    ):
        # the chat dataset maps context_long; reading it as pairs.json's layout finds none
        info = json.loads((workdir / "data" / "dataset_info.json").read_text())
        info["chat"]["columns"].pop("long_prompt")
        other = workdir / "data_unmapped"
        other.mkdir(exist_ok=True)
        (other / "dataset_info.json").write_text(json.dumps(info))
        (other / "chat.json").write_text((workdir / "data" / "chat.json").read_text())
        _pairwise_dataset(workdir, dataset="chat", dataset_dir=str(other), solopo_alpha=1.0)


def test_examples_tokenized_without_long_rows_are_refused_by_the_collator():
    """A dataset tokenized earlier without SoLoPO (LLaMA-Factory's ``tokenized_path``) has no long
    rows: the collator says so instead of a KeyError."""
    from solopo_kernels.integrations.llamafactory.data import SoLoPODataCollator

    collator = SoLoPODataCollator(short=lambda features: {}, long_rows=("chosen",))
    with pytest.raises(ValueError, match="long_prompt: the examples have no long rows"):
        collator([{"chosen_input_ids": [1, 2], "rejected_input_ids": [1, 3]}])


# ------------------------------------------------------------------ refusals
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"stage": "sft"},
            "stage: solopo_kernels' LLaMA-Factory launcher runs stage: dpo only, got 'sft'",
        ),
        ({"solopo_alhpa": 1.0}, "solopo_alhpa: not a solopo_kernels option"),
        ({"use_mca": True}, "use_mca: the Megatron-Core DPO path is not patched"),
        ({"solopo_ra_target": "rejected"}, "solopo_ra_target: expected one of"),
        (
            {"solopo_head_kernel": {"backend": "cuda"}},
            "solopo_head_kernel.backend: expected one of",
        ),
        (
            {"pref_loss": "hinge", "solopo_alpha": 1.0},
            "pref_loss: SoLoPO (solopo_alpha > 0) is defined for",
        ),
        ({"ld_alpha": 0.5}, "ld_alpha: LD-DPO's length-desensitized log-probs"),
        (
            {"pref_loss": "simpo", "solopo_precompute_ref_log_probs": True},
            "pref_loss='simpo' uses no reference model",
        ),
    ],
    ids=["stage", "typo", "mca", "ra-target", "kernel", "hinge", "ld-alpha", "precompute-simpo"],
)
def test_refusals_name_the_option(workdir, overrides, message):
    with pytest.raises(ValueError) as error:
        _run(_args(workdir, "refused", **overrides), patched=True)
    assert message in str(error.value)


def test_reentrant_checkpointing_is_refused_for_solopo_in_a_distributed_run(workdir, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="use_reentrant_gc: SoLoPO"):
        run_exp(_args(workdir, "ddp", solopo_alpha=1.0))


def test_a_multi_device_launch_restarts_under_torchrun(monkeypatch):
    from solopo_kernels.integrations.llamafactory import launcher

    monkeypatch.setenv("FORCE_TORCHRUN", "1")
    monkeypatch.setenv("NPROC_PER_NODE", "8")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    command = launcher._torchrun_command(["config.yaml", "solopo_alpha=1"])
    assert command[:1] == ["torchrun"] and command[command.index("--nproc_per_node") + 1] == "8"
    assert command[-5:] == [
        "-m",
        "solopo_kernels.integrations.llamafactory",
        "train",
        "config.yaml",
        "solopo_alpha=1",
    ]
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert launcher._torchrun_command(["config.yaml"]) is None


# ------------------------------------------------------------------ the command line
def test_the_documented_yaml_runs_from_the_command_line(workdir, capsys):
    """examples/llamafactory/solopo_dpo.yaml (the docs' example) through the launcher's command
    line (``main``, what ``python -m solopo_kernels.integrations.llamafactory`` runs), with the
    model, reference and data overridden like ``llamafactory-cli train cfg.yaml key=value``."""
    from solopo_kernels.integrations.llamafactory import launcher

    config = Path(__file__).resolve().parents[2] / "examples" / "llamafactory" / "solopo_dpo.yaml"
    output_dir = workdir / "runs" / "cli"
    overrides = {
        "model_name_or_path": workdir / "policy",
        "ref_model": workdir / "reference",
        "template": "default",
        "dataset": "pairs",
        "dataset_dir": workdir / "data",
        "output_dir": output_dir,
        "max_steps": 1,
        "logging_steps": 1,
        "bf16": False,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "report_to": "none",  # (save_strategy=no would read as False: the YAML's save_steps wait)
    }
    argv = ["train", str(config), *(f"{key}={value}" for key, value in overrides.items())]
    assert launcher.main(argv) == 0
    state = json.loads((output_dir / "trainer_state.json").read_text())
    [step] = [entry for entry in state["log_history"] if "loss" in entry]
    assert step["solo_ra/alignment_loss"] > 0  # the YAML's solopo_alpha: 1.0 reached the trainer
    assert launcher.main([]) == 2 and "usage:" in capsys.readouterr().err


# ------------------------------------------------------------------ the environment
def test_trl_imported_before_llamafactory_names_the_fix():
    """With transformers 5, TRL 0.24's optional-package checks are always true unless LLaMA-Factory
    corrects transformers' check first: trl imported before it makes LLaMA-Factory's DPO trainer
    import packages that are not installed (mergekit, llm_blender). The import names the fix
    instead of TRL's chained RuntimeError. In a fresh interpreter: trl first, then the trainer."""
    import subprocess
    import sys

    code = "import trl.import_utils\nfrom solopo_kernels.integrations.llamafactory import trainer\n"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0
    assert "ImportError: LLaMA-Factory's DPO trainer cannot be imported" in result.stderr
    assert (
        "Import llamafactory (or solopo_kernels.integrations.llamafactory) before trl"
        in result.stderr
    )
