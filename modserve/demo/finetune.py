"""Experts made by real gradient steps on MGSM text, so low-rank packs meet a real fine-tune.

`synthetic.build_family` plants its changes (seeded noise, strong where an expert should
move): the right layer pattern for `analyze`, but a random-jitter Δ — the worst case for
a low-rank delta pack — and a random model's arbitrary next-token choices. Here:

- the base is trained on mixed-language text (all MGSM languages), so its next-token
  distributions are those of text, peaked and far from uniform, and top-1 agreement
  between two of its variants means something (`Recipe.base_steps` says how long; a model
  too big for that on a CPU keeps the seeded init, peaked by its scale, as its base);
- the math expert is the base trained further on English math questions, only in the
  middle layers; each language expert is the base trained on its language's questions,
  only in the outer layers (the layers its pack takes, transitions included).

Optimizer: AdamW, as real LLM fine-tunes (the paper's experts included) are made. Its
per-coordinate normalisation gives a Δ with real structure but no planted rank; SGD's
few-step Δ is a sum of gradients of rank ≤ tokens per step, which would flatter low-rank
packs. Training is seeded (batches from a torch Generator, no dropout): the same inputs give
the same bytes on one machine (float sums may round differently on another CPU or thread
count). MGSM rows
[0, HELD_OUT) train; rows from HELD_OUT on are held out to score the models.

The tiny family's tokenizer is byte-level: token id b is byte b, so text is encoded with
`str.encode` and every model here reads and writes exactly what the served one does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from modserve.checkpoint import layer_index
from modserve.demo.synthetic import (
    BOS_ID,
    EOS_ID,
    Family,
    TinySpec,
    base_weights,
    hf_config,
    write_checkpoint,
)
from modserve.errors import ModserveError
from modserve.packs.fidelity import REPOSITORY_MGSM

HELD_OUT = 200  # MGSM has 250 rows: 200 to train on, 50 never seen by any model here
MGSM_LANGUAGES = ("bn", "de", "en", "es", "fr", "ja", "ru", "sw", "te", "th", "zh")
SCORED_TOKENS = 128  # per held-out question: enough to score, cheap on the medium model


@dataclass(frozen=True)
class Recipe:
    """How long and on what each model trains. `base_steps: 0` keeps the seeded init as the
    base (peaked by its scale, see `synthetic.base_weights`): for a model too big to
    pre-train in seconds on a CPU, where a useful base run takes minutes."""

    base_steps: int = 60
    base_lr: float = 3e-3
    expert_steps: int = 16
    expert_lr: float = 3e-4  # a few percent of relative change per swapped matrix, as in real fine-tunes
    batch_size: int = 8
    seq_len: int = 32
    score_questions: int = 4  # held-out questions per language to score each model on (0: none)
    seed: int = 0


def read_questions(mgsm: Path, language: str, rows: slice) -> list[str]:
    file = Path(mgsm) / f"mgsm_{language}.tsv"
    try:
        lines = [line for line in file.read_text(encoding="utf-8").splitlines() if line]
    except OSError as err:
        raise ModserveError(f"{file}: cannot read MGSM questions ({err.strerror})") from None
    return [line.split("\t")[0] for line in lines[rows]]


def token_stream(texts: list[str]) -> torch.Tensor:
    """Every text as BOS + its UTF-8 bytes + EOS, one after the other."""
    ids: list[int] = []
    for text in texts:
        ids += [BOS_ID, *text.encode("utf-8"), EOS_ID]
    return torch.tensor(ids, dtype=torch.long)


class Trainer:
    """One transformers model for a whole family: each run loads its start weights into it,
    so the model is built once."""

    def __init__(self, spec: TinySpec, recipe: Recipe):
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.initialization import no_init_weights

        config = hf_config(spec)
        hf = AutoConfig.for_model(config.pop("model_type"), **config)
        with no_init_weights():  # every weight is loaded before use
            self.model = AutoModelForCausalLM.from_config(hf, dtype=torch.float32)
        self.spec, self.recipe = spec, recipe

    def load(self, weights: dict[str, torch.Tensor]) -> None:
        missing = set(self.model.load_state_dict(weights, strict=False).missing_keys)
        if self.spec.tie_embeddings:
            missing.discard("lm_head.weight")
        if missing:
            raise ModserveError(f"weights for {self.spec.arch} lack {sorted(missing)[:3]}")

    def train(
        self, start: dict[str, torch.Tensor], stream: torch.Tensor, trainable, steps: int, lr: float, seed: int
    ) -> dict[str, torch.Tensor]:
        """`steps` AdamW steps of next-token loss on random windows of `stream`, updating only
        the parameters `trainable(name)` accepts; returns every weight (the frozen ones are
        `start`'s own tensors, not copies: a 181M model is copied once per expert, not twice)."""
        recipe = self.recipe
        self.load(start)
        params = []
        for name, param in self.model.named_parameters():
            param.requires_grad_(trainable(name))
            if param.requires_grad:
                params.append(param)
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        gen = torch.Generator().manual_seed(seed)
        window = recipe.seq_len
        if stream.numel() <= window:
            raise ModserveError(f"training text too short: {stream.numel()} tokens for windows of {window}")
        self.model.train()
        for _ in range(steps):
            starts = torch.randint(0, stream.numel() - window, (recipe.batch_size,), generator=gen)
            batch = torch.stack([stream[s : s + window] for s in starts.tolist()])
            loss = self.model(input_ids=batch, labels=batch).loss  # shifted inside: seq_len - 1 targets
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        state = self.model.state_dict()
        return {name: state[name].detach().clone() if trainable(name) else start[name] for name in start}

    @torch.no_grad()
    def top1_accuracy(self, weights: dict[str, torch.Tensor], texts: list[str]) -> float:
        """Teacher-forced: how often the likeliest next token is the text's next byte."""
        self.load(weights)
        self.model.eval()
        hits = total = 0
        for text in texts:
            ids = token_stream([text])[None, :SCORED_TOKENS]
            predicted = self.model(input_ids=ids[:, :-1]).logits.argmax(-1)
            hits += int((predicted == ids[:, 1:]).sum())
            total += ids.shape[1] - 1
        return hits / total


def layer_sets(spec: TinySpec) -> tuple[set[int], set[int]]:
    """(outer, middle): the layers language experts train, and those the math expert trains."""
    layers = range(spec.num_layers)
    outer = {i for i in layers if i < spec.planted_bottom or i >= spec.num_layers - spec.planted_top}
    return outer, set(layers) - outer


def in_layers(layers: set[int]):
    return lambda name: layer_index(name) in layers


@dataclass
class TrainedFamily:
    family: Family
    held_out_top1: dict[str, float]  # model name -> teacher-forced top-1 on held-out MGSM text
    majority_top1: dict[str, float]  # the same texts, always guessing their most frequent byte


def train_family(
    root: Path,
    spec: TinySpec,
    languages: tuple[str, ...],
    recipe: Recipe = Recipe(),
    mgsm: Path = REPOSITORY_MGSM,
) -> TrainedFamily:
    """Write base/, math/ and one expert per language under `root`, each a normal HF checkpoint."""
    unknown = [lang for lang in languages if lang not in MGSM_LANGUAGES]
    if unknown:
        raise ModserveError(f"no MGSM text to train {', '.join(unknown)} experts on (MGSM has {MGSM_LANGUAGES})")
    trainer = Trainer(spec, recipe)
    train = slice(0, HELD_OUT)
    mixed = token_stream([q for lang in MGSM_LANGUAGES for q in read_questions(mgsm, lang, train)])
    base = trainer.train(base_weights(spec), mixed, lambda _: True, recipe.base_steps, recipe.base_lr, recipe.seed)
    outer, middle = layer_sets(spec)
    english = token_stream(read_questions(mgsm, "en", train))
    math = trainer.train(base, english, in_layers(middle), recipe.expert_steps, recipe.expert_lr, recipe.seed + 1)
    family = Family(base=write_checkpoint(root / "base", spec, base), math=write_checkpoint(root / "math", spec, math))
    scores = Scores(trainer, mgsm, recipe.score_questions)
    scores.add("base", base, MGSM_LANGUAGES)
    scores.add("math", math, ("en",))
    for k, lang in enumerate(languages):
        text = token_stream(read_questions(mgsm, lang, train))
        tuned = trainer.train(base, text, in_layers(outer), recipe.expert_steps, recipe.expert_lr, recipe.seed + 100 + k)
        family.languages[lang] = write_checkpoint(root / lang, spec, tuned)
        scores.add(lang, tuned, (lang,))
    return TrainedFamily(family, scores.top1, scores.majority)


class Scores:
    """Teacher-forced top-1 of each model on held-out questions, beside the top-1 of always
    guessing those texts' most frequent byte (uniform chance, 1/256, is far lower still)."""

    def __init__(self, trainer: Trainer, mgsm: Path, per_language: int):
        self.trainer, self.mgsm, self.per_language = trainer, mgsm, per_language
        self.top1: dict[str, float] = {}
        self.majority: dict[str, float] = {}

    def add(self, model: str, weights: dict[str, torch.Tensor], languages: tuple[str, ...]) -> None:
        if not self.per_language:
            return
        rows = slice(HELD_OUT, HELD_OUT + self.per_language)
        texts = [q for lang in languages for q in read_questions(self.mgsm, lang, rows)]
        targets = torch.cat([token_stream([t])[1:SCORED_TOKENS] for t in texts])
        self.majority[model] = float((targets == targets.bincount().argmax()).float().mean())
        self.top1[model] = self.trainer.top1_accuracy(weights, texts)
