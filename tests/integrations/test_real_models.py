"""SoLoPOTrainer on a real pretrained model: SmolLM2-135M-Instruct with its chat template.

The loss of the first batch of conversational rows (``compute_loss``, as the first training
step computes it) equals the SoLoPO objective computed by hand from the model's own logits
(float64 ``log_softmax``), on token ids built the way TRL 1.16 tokenizes conversational rows:
the prompt rendered with the generation prompt, the prompt + response rendered whole, the
response = what follows the prompt (for SmolLM2 the answer, ``<|im_end|>`` and a newline).
Float32: to 1e-5 relative (float32 sums run in another order in the trainer's batched forward than
in the hand computation, an order that depends on the CPU's matmul kernels: 4.9e-6 measured on an
Intel Xeon with AVX-512; a wrong loss is off by orders of magnitude more). ``bf16=True``
(autocast): the first loss is the model's bf16 forward (the body under autocast on the collated
batch, whose shapes bf16 rounding depends on; the head's inputs rounded to bf16 and accumulated
exactly, as the kernel does), not the float32 one.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytest.importorskip("trl", reason="the trl extra is not installed")

from tests import reference  # noqa: E402

BIOGRAPHIES = {
    "Maria Okafor": "Maria Okafor was born in Lisbon. She works for Northwind Shipping.",
    "Tomas Reyes": "Tomas Reyes was born in Quito. He works for Bluefield Bank.",
    "Anna Weber": "Anna Weber was born in Graz. She works for Orchid Pharma.",
    "Kenji Sato": "Kenji Sato was born in Osaka. He works for Ridgeway Motors.",
}


def _rows() -> list[dict[str, Any]]:
    """Two pairs: the question after its biography (short) and after all four (long)."""
    rows = []
    for name, other in (("Maria Okafor", "Tomas Reyes"), ("Kenji Sato", "Anna Weber")):
        question = f"Which company does {name} work for? Answer in one sentence."
        company = BIOGRAPHIES[name].split("works for ")[1].rstrip(".")
        wrong = BIOGRAPHIES[other].split("works for ")[1].rstrip(".")
        others = [text for person, text in BIOGRAPHIES.items() if person != name]
        long_context = " ".join([others[0], BIOGRAPHIES[name], *others[1:]])
        pronoun = BIOGRAPHIES[name].split(". ")[1].split()[0]
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"{BIOGRAPHIES[name]}\n\n{question}"}],
                "long_prompt": [{"role": "user", "content": f"{long_context}\n\n{question}"}],
                "chosen": [{"role": "assistant", "content": f"{pronoun} works for {company}."}],
                "rejected": [{"role": "assistant", "content": f"{pronoun} works for {wrong}."}],
            }
        )
    return rows


def _conversation_ids(tokenizer, prompt, response) -> tuple[list[int], int]:
    """TRL's conversational tokenization, written out: the ids of prompt + response and where
    the response starts (the prompt rendered with the generation prompt is their prefix)."""
    prompt_ids = tokenizer.apply_chat_template(
        prompt, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    ids = tokenizer.apply_chat_template(prompt + response, tokenize=True, return_dict=True)[
        "input_ids"
    ]
    assert ids[: len(prompt_ids)] == prompt_ids, "the chat template renders the prompt otherwise"
    return ids, len(prompt_ids)


def _hand_loss(model, tokenizer, rows, **options: Any) -> float:
    """SimPO-SoLoPO from the model's own float32 logits (float64 log_softmax), row by row."""

    def logps(prompt, response):
        ids, start = _conversation_ids(tokenizer, prompt, response)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, :-1]
        token_logps = torch.log_softmax(logits.double(), -1)[torch.arange(len(ids) - 1), ids[1:]]
        return token_logps[start - 1 :].sum(), float(len(ids) - start)

    short = [logps(r["prompt"], r["chosen"]) for r in rows]
    short += [logps(r["prompt"], r["rejected"]) for r in rows]
    long = [logps(r["long_prompt"], r["chosen"]) for r in rows]
    loss, _, _ = reference.solopo_objective(
        torch.stack([s for s, _ in short]),
        torch.tensor([n for _, n in short], dtype=torch.float64),
        torch.stack([s for s, _ in long]),
        torch.tensor([n for _, n in long], dtype=torch.float64),
        loss_type="simpo",
        **options,
    )
    return loss.item()


def _bf16_hand_loss(model, batch, **options: Any) -> float:
    """SimPO-SoLoPO as a bf16 autocast run computes it, by hand on the collated batch
    (``reference.autocast_batch_logps``: the body under autocast on the padded batch, the head
    exact from bf16-rounded inputs). Short rows ``[chosen..., rejected...]``, long rows the
    chosen ones; the float32 test checks this batch against the chat template row by row."""
    loss, _, _ = reference.solopo_objective(
        *reference.autocast_batch_logps(model, batch),
        *reference.autocast_batch_logps(model, batch, prefix="long_"),
        loss_type="simpo",
        **options,
    )
    return loss.item()


def _trainer(model, tokenizer, rows, tmp_path, *, bf16: bool, **options: Any):
    from datasets import Dataset

    from solopo_kernels.integrations.trl import SoLoPOConfig, SoLoPOTrainer

    args = SoLoPOConfig(
        output_dir=str(tmp_path),
        solopo_loss_type="simpo",
        beta=options["beta"],
        gamma=options["gamma"],
        solopo_alpha=options["alpha"],
        max_length=512,
        max_long_length=1024,
        per_device_train_batch_size=len(rows),  # the first step is every row
        max_steps=1,
        logging_steps=1,
        learning_rate=1e-6,
        use_cpu=True,
        bf16=bf16,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataset_num_proc=None,
    )
    return SoLoPOTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )


OPTIONS = dict(beta=2.0, gamma=0.5, alpha=1.0)


@pytest.fixture
def smollm2(smollm2_folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(smollm2_folder)


def _first_batch(trainer) -> dict[str, torch.Tensor]:
    """The first batch: every row, collated as the first training step collates it."""
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    return trainer.data_collator(rows)


def _first_loss(trainer) -> float:
    """The loss of the first batch, as the first training step computes it (without the backward
    and the optimizer step: the value is what this test checks)."""
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, _first_batch(trainer)).item()


def test_first_loss_on_chat_rows_is_the_hand_computation(smollm2, tmp_path):
    model, tokenizer = smollm2
    expected = _hand_loss(model, tokenizer, _rows(), **OPTIONS)
    first = _first_loss(_trainer(model, tokenizer, _rows(), tmp_path, bf16=False, **OPTIONS))
    assert abs(first - expected) <= 1e-5 * abs(expected), (first, expected)


def test_first_bf16_loss_is_the_models_bf16_forward(smollm2, tmp_path):
    # One pair: bf16 matmuls are slow on CPUs without bf16 units (13 s on two quiet AVX2 cores).
    model, tokenizer = smollm2
    rows = _rows()[:1]
    float32_loss = _hand_loss(model, tokenizer, rows, **OPTIONS)
    trainer = _trainer(model, tokenizer, rows, tmp_path, bf16=True, **OPTIONS)
    bf16_loss = _bf16_hand_loss(model, _first_batch(trainer), **OPTIONS)
    # compute_loss runs its forwards under the autocast that bf16=True gives the model.
    first = _first_loss(trainer)
    gap = abs(bf16_loss - float32_loss)
    assert gap > 1e-4, "the check needs bf16 to move this loss"
    # bf16 moved it within reason: by 5.2 % on an AVX-512 BF16 CPU (torch 2.13).
    assert abs(first - float32_loss) <= 2**-3 * abs(float32_loss)
    assert abs(first - bf16_loss) <= 1e-6 + 0.01 * gap, (first, bf16_loss, float32_loss)
