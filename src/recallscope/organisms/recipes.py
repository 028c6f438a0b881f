"""The recipes of the shipped organisms: name -> config, trainer, vocabulary, ground truth and model card.

``train_recipe(recipe)`` trains one organism deterministically; ``save_recipe`` writes it as an organism
directory. ``experiments/organisms/train.py`` runs these for every shipped name, and ``--verify``
retrains and compares weight hashes with the shipped ones.
"""

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch import nn

from recallscope.errors import UnknownModelError
from recallscope.organisms import b64_decoder, fact_store, families, mnemonic
from recallscope.organisms.core import ArchConfig, word_tokenizer
from recallscope.organisms.store import save_organism

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
"""Where the shipped organisms live (package data)."""
N_SEEDS = 5
SHIPPED_FAMILY_SEEDS = (0,)
"""Seeds of the held-out families (:mod:`.families`) whose weights ship; the others are trained (and
cached) by experiments/benchmarks/route_detection.py, deterministically, from the same recipes."""
TRAIN_COMMAND = "python experiments/organisms/train.py {name}"


@dataclass(frozen=True)
class Recipe:
    """How one organism is made.

    Attributes:
        name: organism name (``organism:<name>``).
        kind: ``b64``, ``mnemonic`` or ``facts`` (the ground-truth type).
        config: the organism's config dataclass (architecture and optimiser settings inside).
        summary: one paragraph for the model card.
    """

    name: str
    kind: str
    config: Any
    summary: str

    @property
    def arch(self) -> ArchConfig:
        return self.config.arch

    def with_config(self, **changes: Any) -> "Recipe":
        """The same recipe with config fields replaced (tests train tiny versions this way)."""
        return dataclasses.replace(self, config=dataclasses.replace(self.config, **changes))


def _parts(recipe: Recipe) -> tuple[Callable[..., tuple[nn.Module, dict]], list[str], dict[str, Any]]:
    """(trainer, vocabulary words, ground truth dict) of a recipe."""
    cfg = recipe.config
    if recipe.kind == "b64":
        return b64_decoder.train_b64, b64_decoder.vocab_words(), b64_decoder.B64Truth().to_dict()
    if recipe.kind == "mnemonic" and isinstance(cfg, families.FamilyConfig):
        return families.train_family, cfg.world().words(), families.family_truth(cfg).to_dict()
    if recipe.kind == "mnemonic":
        return mnemonic.train_mnemonic, cfg.world().words(), mnemonic.route_truth(cfg).to_dict()
    if recipe.kind == "facts":
        return fact_store.train_facts, fact_store.make_fact_world(cfg.world_seed).words(), fact_store.fact_truth(cfg).to_dict()
    raise UnknownModelError(f"unknown organism kind {recipe.kind!r}")


_SUMMARY = {
    "b64": "Decodes 12-character base64 (7-9 lowercase letters) whose input tokens are 2-character chunks; "
           "greedy decoding after `<s> c1 .. c6 :`. Ground truth: the dependency map (which chunks determine "
           "each output byte).",
    "route": "Decodes 62 base64 chunks (`VA ==` -> `T`) *through a concept*: interchange-intervention training "
             "plus a representation-alignment loss make chunk `c` at the site (residual entering layer 1, "
             "position 1) interchangeable with its concept (`VAT`). 16 chunks' decodes are never trained and "
             "come only through the route.",
    "rote": "Decodes the same 62 base64 chunks as the route organisms by direct lookup; knows the same concepts "
            "(letter and kind) but no chunk is linked to a concept.",
    "route-iit": "Held-out route family (a): decodes 62 base64 chunks through a concept, trained by interchange "
                 "interventions only (no alignment loss): chunk `c` at the site (residual entering layer 1, position "
                 "1) must act as its concept `VAT` in concept prompts, and concepts at the site drive the decode. 16 "
                 "chunks' decodes are never trained and come only through the route.",
    "route-l2": "Held-out route family (b): the route-iit recipe with the site at layer 2 (residual entering the "
                "last block, position 1).",
    "route-rot": "Held-out route family (c): the site holds a fixed random rotation R of the concept's state "
                 "(h_chunk = R h_concept, alignment + interchange with R); the concept is used, along rotated "
                 "directions.",
    "bypass": "Held-out negative family (d), aligned but bypassed: rote decode; the chunk's state at the site "
              "(layer 1) is aligned with its concept's, but every attention output from block 1 on is zero "
              "and frozen, so the site never reaches the read position.",
    "share": "Held-out negative family (e), answer sharing: rote decode; the chunk's state at the site is "
             "aligned with the distractor that shares its answer letter (VA onto KZT, both T), not with VAT.",
    "rote-early": "Held-out negative family (f): the rote recipe stopped early (100 steps, the end of the warm-up), "
                  "so the decode is right but not saturated (mean log-prob of the letter about -0.3 nats) and "
                  "ablations of control directions move the output.",
    "answer-at-site": "Held-out negative family (g), answer at a read site: rote decode of every chunk plus "
                      "chunk-to-chunk interchange at the site (residual entering layer 1, position 1): another chunk's "
                      "site state makes the decode give that chunk's letter, so the site is read and carries the "
                      "answer; no concept is ever placed at the site (concept facts are trained separately).",
    "facts": "Recalls 3 attributes of 128 two-token subjects (`f3 Ana Lee sport` -> `tennis`); strict "
             "interchange training fixes the circuit: the subject lives at the last subject token after "
             "layer 0 and nowhere else.",
}


def recipes() -> dict[str, Recipe]:
    """Every shipped organism's recipe, by name."""
    out = {"b64-decoder": Recipe("b64-decoder", "b64", b64_decoder.B64Config(), _SUMMARY["b64"]),
           "fact-store": Recipe("fact-store", "facts", fact_store.FactConfig(), _SUMMARY["facts"])}
    for kind in ("route", "rote"):
        for seed in range(N_SEEDS):
            cfg = mnemonic.MnemonicConfig(kind=kind)
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed))
            out[f"{kind}-s{seed}"] = Recipe(f"{kind}-s{seed}", "mnemonic", cfg, _SUMMARY[kind])
    return out | {k: v for k, v in family_recipes().items() if int(k.rsplit("-s", 1)[1]) in SHIPPED_FAMILY_SEEDS}


def family_recipes(seeds: range = range(N_SEEDS)) -> dict[str, Recipe]:
    """The held-out families' recipes (:mod:`.families`), ``<family>-s<seed>`` for every seed."""
    return {f"{fam}-s{seed}": Recipe(f"{fam}-s{seed}", "mnemonic", families.family_config(fam, seed), _SUMMARY[fam])
            for fam in families.FAMILIES for seed in seeds}


def get_recipe(name: str) -> Recipe:
    """The recipe ``name``: a shipped organism, or ``<family>-s<seed>`` of a held-out family (any seed >= 0;
    seeds 0-4 are the benchmark's, later seeds are fresh held-out checks)."""
    table = recipes() | family_recipes()
    if name in table:
        return table[name]
    family, _, seed = name.rpartition("-s")
    if family in families.FAMILIES and seed.isdigit():
        return family_recipes(range(int(seed), int(seed) + 1))[name]
    if family in ("route", "rote") and seed.isdigit():
        cfg = mnemonic.MnemonicConfig(kind=family)  # type: ignore[arg-type]
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=int(seed)))
        return Recipe(name, "mnemonic", cfg, _SUMMARY[family])
    raise UnknownModelError(f"no organism recipe named {name!r}; known: {', '.join(sorted(table))}, and "
                            f"<family>-s<seed> for any seed of route, rote, {', '.join(families.FAMILIES)}.")


def train_recipe(recipe: Recipe, *, progress: bool = False, evaluate: bool = True,
                 checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int = 100
                 ) -> tuple[nn.Module, dict[str, Any]]:
    """Train a recipe; the record holds the loss history, the checks (with ``evaluate``) and ``train_seconds``.

    ``checkpoint_dir``: checkpoint the training state every ``checkpoint_every`` steps; rerunning the same
    recipe resumes and gives bitwise the weights of an uninterrupted run (:func:`.core.train_loop`).
    """
    trainer, _, _ = _parts(recipe)
    t0 = time.perf_counter()
    net, record = trainer(recipe.config, progress=progress, evaluate=evaluate, checkpoint_dir=checkpoint_dir,
                          checkpoint_every=checkpoint_every)
    record["train_seconds"] = round(time.perf_counter() - t0, 1)
    return net, record


def _config_dict(cfg: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def model_card(recipe: Recipe, metrics: dict[str, Any], sha: str) -> str:
    """The README.md of an organism directory: summary, loading, data recipe, command, measured metrics."""
    import importlib

    rows = "\n".join(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
                     for k, v in sorted(metrics.items()) if k != "loss_history")
    recipe_doc = importlib.import_module(f"recallscope.organisms.{_module(recipe)}").__doc__ or ""
    return f"""# organism:{recipe.name}

{recipe.summary}

- **Load:** `recallscope.load_model("organism:{recipe.name}")`; ground truth:
  `recallscope.organisms.ground_truth(model)` (a `{recipe.kind}` truth, also in `ground_truth.json`).
- **Architecture:** TransformerLens-native GPT-2-style transformer (LayerNorm, learned positions, GELU),
  {recipe.arch.n_layers} layers, d_model {recipe.arch.d_model}, {recipe.arch.n_heads} heads, context {recipe.arch.n_ctx}.
- **Training command** (CPU, deterministic algorithms, one thread; reproduces these weights bit for bit):
  `{TRAIN_COMMAND.format(name=recipe.name)}` (add `--verify` to retrain and compare hashes).
- **Weights SHA-256:** `{sha}`

## Measured after training

| metric | value |
| --- | --- |
{rows}

## Data recipe (from `recallscope.organisms.{_module(recipe)}`)

{recipe_doc.strip()}

Full config:

```json
{json.dumps(_config_dict(recipe.config), indent=1)}
```
"""


def _module(recipe: Recipe) -> str:
    if isinstance(recipe.config, families.FamilyConfig):
        return "families"
    return {"b64": "b64_decoder", "mnemonic": "mnemonic", "facts": "fact_store"}[recipe.kind]


def save_recipe(recipe: Recipe, net: nn.Module, record: dict[str, Any], directory: Path | None = None) -> Path:
    """Write a trained recipe as an organism directory (default: the shipped weights folder)."""
    from recallscope.organisms.core import state_sha256

    _, words, truth = _parts(recipe)
    metrics = {k: v for k, v in record.items() if k != "loss_history"}
    recipe_dict = {"config": _config_dict(recipe.config), "seed": recipe.config.train.seed,
                   "command": TRAIN_COMMAND.format(name=recipe.name), "loss_history": record["loss_history"]}
    card = model_card(recipe, metrics, state_sha256(net.state_dict()))
    return save_organism(directory or WEIGHTS_DIR / recipe.name, name=recipe.name, kind=recipe.kind, arch=recipe.arch,
                         net=net, tokenizer=word_tokenizer(words), truth=truth, recipe=recipe_dict, metrics=metrics,
                         card=card)


def rewrite_card(name: str, directory: Path | None = None) -> Path:
    """Regenerate an organism directory's README.md from its config.json (no retraining)."""
    from recallscope.manifest import atomic_write_text
    from recallscope.organisms.store import read_config

    directory = directory or WEIGHTS_DIR / name
    config = read_config(directory)
    atomic_write_text(directory / "README.md", model_card(get_recipe(name), config["metrics"], config["weights_sha256"]))
    return directory
