"""Memory Mosaic against GPT at several depths on TinyStories: the paper's language-modelling claims
(Figures 7 and 8, and story quality) at a scale two CPU cores can carry.

One *job* trains one model (kind, depth, seed) with the project's trainer and then measures it:
validation loss, loss by token position in distribution (TinyStories valid) and out of
distribution (see `ood.py`), the likelihood-ranking prompt suite (see `prompts.py`) and a few
sampled stories. Both kinds share the width, heads, block, tokens and seed at each depth; their
learning rates are the ones of their shipped presets (`tinystories-cpu`, `gpt-tinystories-cpu`).

Every job writes `OUT/results/<job>.json` when it is done and is skipped when that file exists, so
an interrupted run continues where it stopped. Jobs run in parallel worker processes (spawned, one
torch thread each by default).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import torch

from memory_mosaics.errors import ConfigError, MosaicError

KINDS = ("mosaic", "gpt")
PRESETS = {"mosaic": "tinystories-cpu", "gpt": "gpt-tinystories-cpu"}
STORY_PROMPTS = (
    "Once upon a time, there was a little girl named",
    "One day, a boy named Tom found a big box in the garden.",
    "The little dog was very sad because",
)


@dataclass
class ReproduceConfig:
    data: str = "../shared/data/tinystories"  # train.txt + valid.txt, or a `mosaic prepare` folder
    out: str = "runs/reproduce"
    depths: tuple[int, ...] = (1, 2, 4)
    seeds: tuple[int, ...] = (1337, 1338)
    max_steps: int = 600
    vocab_size: int = 4096  # of the BPE trained on the training stories
    max_docs: int | None = None  # keep the first N stories of each split (for quick runs)
    ood: str = "python-docs"  # or a local file/folder, e.g. Simple English Wikipedia as text
    model_overrides: dict = field(default_factory=dict)  # e.g. {"n_embd": 32}: applied to both kinds
    train_overrides: dict = field(default_factory=dict)  # e.g. {"batch_size": 2}: applied to both kinds
    eval_dtype: str = "bfloat16"  # the prompt suite is always scored in float32
    max_eval_docs: int | None = None  # cap documents / windows per evaluation (for quick runs)
    prompts_per_category: int | None = None  # score only the first N prompts of each category (quick runs)
    sample_tokens: int = 120
    jobs: int = 2
    threads: int = 1

    def __post_init__(self) -> None:
        if not self.depths or any(d < 1 for d in self.depths):
            raise ConfigError(f"depths must be positive integers, got {self.depths!r}")
        if not self.seeds or any(s < 0 for s in self.seeds):
            raise ConfigError(f"seeds must be non-negative integers, got {self.seeds!r}")
        for name in ("max_steps", "jobs", "threads", "vocab_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"eval_dtype must be float32 or bfloat16, got {self.eval_dtype!r}")


@dataclass(frozen=True)
class Job:
    kind: str
    depth: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.kind}-d{self.depth}-s{self.seed}"


def plan_jobs(config: ReproduceConfig) -> list[Job]:
    """Seed by seed (a run cut short still holds whole seeds), deepest first (the slowest first)."""
    return [
        Job(kind, depth, seed)
        for seed in config.seeds
        for depth in sorted(config.depths, reverse=True)
        for kind in KINDS
    ]


# ---------------------------------------------------------------------------------------------------
# Data


def data_source(config: ReproduceConfig) -> tuple[Path, Path] | None:
    """None when `config.data` is a prepared data set, else its (train.txt, valid.txt)."""
    from memory_mosaics.data.prepare import MANIFEST

    source = Path(config.data)
    if (source / MANIFEST).is_file():
        return None
    train, valid = source / "train.txt", source / "valid.txt"
    if not (train.is_file() and valid.is_file()):
        raise MosaicError(
            f"--data {source} holds neither a prepared data set (manifest.json) nor train.txt and valid.txt; "
            "point it at ../shared/data/tinystories or at a `mosaic prepare` folder"
        )
    return train, valid


def check_sources(config: ReproduceConfig) -> None:
    """Refuse a bad --data or --ood before anything is written into the work folder."""
    from memory_mosaics.experiments.ood import check_ood

    data_source(config)
    check_ood(config.ood)


def prepare_data(config: ReproduceConfig) -> Path:
    """The prepared data folder: `config.data` itself when prepared, else OUT/data (made once)."""
    from memory_mosaics.data.prepare import MANIFEST, prepare_dataset

    texts = data_source(config)
    if texts is None:
        return Path(config.data)
    train, valid = texts
    docs = f"-docs{config.max_docs}" if config.max_docs else ""
    target = Path(config.out) / f"data-bpe{config.vocab_size}{docs}"
    if not (target / MANIFEST).is_file():
        prepare_dataset(
            str(train), target, "bpe", val=str(valid), vocab_size=config.vocab_size, max_docs=config.max_docs
        )
    return target


# ---------------------------------------------------------------------------------------------------
# One job


def _settings(config: ReproduceConfig, job: Job) -> tuple[dict, dict]:
    """(training settings, model settings) of a job: its kind's preset, the depth, the overrides."""
    from memory_mosaics.commands.train import split_settings
    from memory_mosaics.train.config import load_preset

    settings = load_preset(PRESETS[job.kind])
    settings.update(config.model_overrides)
    settings.update(config.train_overrides)
    settings.update(n_layer=job.depth, seed=job.seed, max_steps=config.max_steps)
    if job.kind == "gpt":
        settings = {k: v for k, v in settings.items() if k not in ("pmem_size", "pmem_count")}
    train_values, _, model_values = split_settings(settings, dict.fromkeys(settings, f"preset {PRESETS[job.kind]}"))
    return train_values, model_values


def count_parameters(model: torch.nn.Module) -> dict:
    """Parameters (tied matrices once), and those outside the token embedding and position table."""
    total = sum(p.numel() for p in model.parameters())
    embeddings = sum(
        m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding)
    )  # the token table (tied with the head) and a GPT's position table
    return {"total": total, "non_embedding": total - embeddings}


def _train(config: ReproduceConfig, job: Job, data_dir: Path, run_dir: Path):
    from memory_mosaics.train.checkpoint import LATEST
    from memory_mosaics.train.config import TrainConfig, build_dataclass
    from memory_mosaics.train.trainer import train

    train_values, model_values = _settings(config, job)
    train_config = build_dataclass(TrainConfig, train_values, source=f"{job.name} training settings")
    resume = (run_dir / LATEST).exists()
    return train(data_dir, run_dir, train_config, model_values, resume=resume, progress=False)


def _samples(model, tokenizer, sample_tokens: int, seed: int) -> list[dict]:
    from memory_mosaics.inference.generate import generate

    samples = []
    for i, prompt in enumerate(STORY_PROMPTS):
        idx = torch.tensor([[tokenizer.eot_id, *tokenizer.encode(prompt)]])
        out = generate(model, idx, sample_tokens, temperature=0.8, top_k=50, stop_token=tokenizer.eot_id, seed=seed + i)
        new = out[0, idx.size(1) :].tolist()
        if tokenizer.eot_id in new:
            new = new[: new.index(tokenizer.eot_id)]
        samples.append({"prompt": prompt, "continuation": tokenizer.decode(new)})
    return samples


def _val_curve(run_dir: Path) -> list[list[float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if line]
    return [[r["step"], r["val_loss"]] for r in rows if r.get("kind") == "val"]


def run_job(config: ReproduceConfig, job: Job, data_dir: Path, ood_tokens) -> dict:
    """Train and measure one model; returns (and saves as OUT/results/<job>.json) its results."""
    from memory_mosaics.data import PreparedData
    from memory_mosaics.eval import evaluate_loss, per_position_loss
    from memory_mosaics.experiments.prompts import load_prompt_suite, score_prompt_suite
    from memory_mosaics.train.checkpoint import load_model

    torch.set_num_threads(config.threads)
    run_dir = Path(config.out) / "runs" / job.name
    started = time.perf_counter()
    trained = _train(config, job, data_dir, run_dir)
    train_s = time.perf_counter() - started

    data = PreparedData.open(data_dir, verify=False)
    model = load_model(run_dir).eval()
    block = model.config.block_size
    dtype, cap = config.eval_dtype, config.max_eval_docs
    val = data.split("val")
    val_loss = evaluate_loss(model, val, block, dtype=dtype, max_windows=cap)
    val_pos = per_position_loss(model, val, block, data.eot_id, dtype=dtype, max_windows=cap)
    ood_seq = min(block, len(ood_tokens) - 1)
    ood_loss = evaluate_loss(model, ood_tokens, ood_seq, dtype=dtype, max_windows=cap)
    ood_pos = per_position_loss(model, ood_tokens, ood_seq, data.eot_id, dtype=dtype, max_windows=cap)
    items = first_per_category(load_prompt_suite(), config.prompts_per_category)
    prompts = score_prompt_suite(model, data.tokenizer, items, max_len=block if job.kind == "gpt" else None)
    samples = _samples(model, data.tokenizer, config.sample_tokens, job.seed)
    settings = _settings(config, job)[0]
    row = {
        "job": job.name,
        "kind": job.kind,
        "depth": job.depth,
        "seed": job.seed,
        "params": count_parameters(model),
        "model_config": model.config.to_dict(),
        "train_config": settings,
        "train_steps": trained.step,
        "train_tokens": trained.step * settings["batch_size"] * (settings.get("grad_accum") or 1) * block,
        "train_time_s": train_s,
        "eval_time_s": time.perf_counter() - started - train_s,
        "val_loss": val_loss.loss,
        "val_tokens": val_loss.tokens,
        "val_curve": _val_curve(run_dir),
        "per_position_val": val_pos.losses,
        "per_position_val_counts": val_pos.counts,
        "ood_loss": ood_loss.loss,
        "ood_tokens": ood_loss.tokens,
        "per_position_ood": ood_pos.losses,
        "per_position_ood_counts": ood_pos.counts,
        "prompt_suite": prompts,
        "samples": samples,
        "finished_at": time.time(),
    }
    results = Path(config.out) / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{job.name}.json").write_text(json.dumps(row) + "\n", encoding="utf-8")
    return row


def finished_rows(config: ReproduceConfig) -> list[dict]:
    """The results of the jobs already done in the work folder."""
    return [_read_row(path) for path in sorted((Path(config.out) / "results").glob("*.json"))]


def rescore_prompts(config: ReproduceConfig, rows: list[dict]) -> list[dict]:
    """Score the current prompt suite again with each finished job's saved model (seconds per model),
    so that a corrected suite does not need new training; the job files are updated."""
    from memory_mosaics.data import PreparedData
    from memory_mosaics.experiments.prompts import load_prompt_suite, score_prompt_suite
    from memory_mosaics.train.checkpoint import load_model

    tokenizer = PreparedData.open(prepare_data(config), verify=False).tokenizer
    items = first_per_category(load_prompt_suite(), config.prompts_per_category)
    for row in rows:
        model = load_model(Path(config.out) / "runs" / row["job"]).eval()
        max_len = model.config.block_size if row["kind"] == "gpt" else None
        row["prompt_suite"] = score_prompt_suite(model, tokenizer, items, max_len=max_len)
        path = Path(config.out) / "results" / f"{row['job']}.json"
        path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    return rows


def _read_row(path: Path) -> dict:
    row = json.loads(path.read_text(encoding="utf-8"))
    row.setdefault("finished_at", path.stat().st_mtime)
    return row


def first_per_category(items: list, count: int | None) -> list:
    """The first `count` items of each category, in suite order (all of them for None)."""
    if count is None:
        return items
    seen: dict[str, int] = {}
    kept = []
    for item in items:
        seen[item.category] = seen.get(item.category, 0) + 1
        if seen[item.category] <= count:
            kept.append(item)
    return kept


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def ood_token_stream(config: ReproduceConfig, data_dir: Path):
    """The out-of-distribution documents, tokenized with the data's tokenizer; and their description."""
    import numpy as np

    from memory_mosaics.data import PreparedData
    from memory_mosaics.data.prepare import encode_documents
    from memory_mosaics.experiments.ood import ood_documents

    tokenizer = PreparedData.open(data_dir, verify=False).tokenizer
    description, docs = ood_documents(config.ood)
    tokens = encode_documents(tokenizer, docs).astype(np.int64)
    return tokens, {"spec": config.ood, "description": description, "documents": len(docs), "tokens": len(tokens)}


# Settings that change what a job computes: a work folder holds results of one choice of them only.
COMPUTE_KEYS = (
    "data", "max_steps", "vocab_size", "max_docs", "ood", "model_overrides", "train_overrides",
    "eval_dtype", "max_eval_docs", "prompts_per_category", "sample_tokens",
)  # fmt: skip


def claim_work_folder(config: ReproduceConfig) -> None:
    """Record the computing settings in OUT/experiment.json, or refuse a folder made with others."""
    out = Path(config.out)
    wanted = {key: config_dict(config)[key] for key in COMPUTE_KEYS}
    record = out / "experiment.json"
    if record.is_file():
        saved = json.loads(record.read_text(encoding="utf-8"))
        changed = [key for key in COMPUTE_KEYS if saved.get(key) != wanted[key]]
        if changed:
            raise ConfigError(
                f"--out {out} holds results computed with other settings ({', '.join(changed)}); "
                "use another --out, or delete that folder to start over"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(wanted, indent=2) + "\n", encoding="utf-8")


def run_experiment(config: ReproduceConfig, on_done: Callable[[dict, list[dict]], None] | None = None) -> list[dict]:
    """Run every job not done yet (in `config.jobs` processes); returns all job results.

    `on_done(row, rows_so_far)` is called in this process after each job, e.g. to rewrite a report.
    """
    claim_work_folder(config)
    data_dir = prepare_data(config)
    ood_tokens, _ = ood_token_stream(config, data_dir)
    rows = finished_rows(config)
    done = {row["job"] for row in rows}
    todo = [job for job in plan_jobs(config) if job.name not in done]

    def finished(row: dict) -> None:
        rows.append(row)
        if on_done is not None:
            on_done(row, rows)

    if config.jobs == 1 or len(todo) <= 1:
        for job in todo:
            finished(run_job(config, job, data_dir, ood_tokens))
        return rows
    context = get_context("spawn")  # fork would copy this process's torch threads and locks
    with ProcessPoolExecutor(
        config.jobs, mp_context=context, initializer=_worker_init, initargs=(config.threads,)
    ) as pool:
        futures = [pool.submit(run_job, config, job, data_dir, ood_tokens) for job in todo]
        for future in as_completed(futures):
            finished(future.result())
    return rows


def config_dict(config: ReproduceConfig) -> dict:
    values = asdict(config)
    values["depths"], values["seeds"] = list(config.depths), list(config.seeds)
    return values
