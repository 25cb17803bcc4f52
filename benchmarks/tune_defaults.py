"""How the model defaults were chosen and checked: tuning on inner splits, scoring on outer validation.

Two commands (results as JSON, plus a markdown table on stdout):

    .venv/bin/python benchmarks/tune_defaults.py evaluate [--params FILE] [--out FILE]
        every model x protocol x dataset x seed, trained as `mfpipe run` trains (`train_model`, the
        validation truth passed for early stopping), scored by warm-user NDCG@10 with its 95% bootstrap
        interval; `--params` (JSON {"bpr": {...}}) overrides defaults, to compare candidates.

    .venv/bin/python benchmarks/tune_defaults.py tune --models bpr,als [--trials 30] [--out FILE]
        `mfpipe.models.search.search` on the train part of each outer split (the outer validation slice is
        never seen), then the best setting refitted on the whole train part and scored once on validation,
        beside the defaults. `--inner same` tunes random protocols on an inner split of the same protocol
        (hundreds of evaluable users instead of the few dozen a temporal split of MovieLens leaves).

Datasets: the ml-latest-small copy in ../shared/data (MOVIELENS env var or --movielens to override) and the
built-in synthetic generator (`synthetic:100k`, seed 42), or those given with `--data [NAME=]SPEC` (repeatable;
e.g. the denser ML-100K-like proxy of benchmarks/dense_proxy.py). Nothing of MovieLens is written out, only scores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from mfpipe.config import Config, DataOptions, SplitOptions
from mfpipe.data import Interactions, read_frame, to_interactions
from mfpipe.evaluation import evaluate_model
from mfpipe.models.search import search
from mfpipe.split import Split, split_interactions
from mfpipe.training import CoreBudget, train_model

ROOT = Path(__file__).resolve().parents[1]
MOVIELENS = Path(os.environ.get("MOVIELENS", ROOT.parent / "shared" / "data" / "ml-latest-small"))
PROTOCOLS = ("random-per-item", "random-per-user", "temporal")
MODELS = ("svd", "als", "bpr", "pop")


def load(spec: str) -> Interactions:
    """ml-latest-small (a folder) or `synthetic:N`, as `mfpipe run --data` reads it."""
    return to_interactions(read_frame(spec, DataOptions(), Path("/nonexistent-data-home"), 42))


def outer_split(data: Interactions, protocol: str, seed: int) -> Split:
    return split_interactions(data, SplitOptions(protocol=protocol, seed=seed))


def score(name: str, split: Split, params: dict[str, Any] | None, seed: int, threads: int) -> dict[str, Any]:
    """Train as the pipeline does and score warm users on validation: NDCG@10, its 95% interval, users."""
    config = Config(seed=seed, model_params={name: params} if params else {}, threads=threads)
    started = time.perf_counter()
    trained = train_model(name, split, config, CoreBudget(threads, [name]))
    report = evaluate_model(trained.model, split, 10, seed=seed)
    ndcg = report.warm["ndcg"]
    epochs = trained.model.history.get("eval_epoch", [])
    return {
        "ndcg": ndcg.mean, "ci95": list(ndcg.ci95), "users": ndcg.n,
        "seconds": round(time.perf_counter() - started, 2), "epochs": int(epochs[-1]) if epochs else None,
    }  # fmt: skip


def datasets(args: argparse.Namespace) -> dict[str, Interactions]:
    """ml-latest-small and synthetic:100k, or the `--data` list (NAME=SPEC, or SPEC named by itself)."""
    specs = {"ml-latest-small": str(args.movielens), "synthetic:100k": "synthetic:100k"}
    if args.data:
        named = (d.partition("=") for d in args.data)
        specs = {(name if sep else Path(name).name or name): (spec if sep else name) for name, sep, spec in named}
    return {name: load(spec) for name, spec in specs.items()}


def cmd_evaluate(args: argparse.Namespace) -> list[dict[str, Any]]:
    params = json.loads(Path(args.params).read_text()) if args.params else {}
    rows = []
    for dataset, data in datasets(args).items():
        for protocol in args.protocols:
            for seed in args.seeds:  # split seed (random protocols) and model seed
                split = outer_split(data, protocol, seed)
                for name in args.models:
                    row = {"dataset": dataset, "protocol": protocol, "seed": seed, "model": name}
                    row |= score(name, split, params.get(name), seed, args.threads)
                    print(json.dumps(row), file=sys.stderr, flush=True)
                    rows.append(row)
    return rows


def cmd_tune(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for dataset, data in datasets(args).items():
        for protocol in args.protocols:
            for seed in args.seeds:
                split = outer_split(data, protocol, seed)
                inner = SplitOptions(protocol="temporal", cutoff_quantile=0.8)
                if args.inner == "same" and protocol != "temporal":
                    inner = SplitOptions(protocol=protocol, seed=seed + 1000)
                for name in args.models:
                    started = time.perf_counter()
                    result = search(name, split.train, args.trials, seed, threads=args.threads, inner=inner)
                    tuned = score(name, split, result.best_params, seed, args.threads)
                    default = score(name, split, None, seed, args.threads)
                    row = {
                        "dataset": dataset, "protocol": protocol, "seed": seed, "model": name,
                        "inner": result.inner_split["protocol"], "inner_users": result.inner_split["evaluable_users"],
                        "inner_default": result.trials[0].value, "inner_best": result.best.value,
                        "best_trial": result.best.number, "best_params": result.best_params,
                        "states": [t.state for t in result.trials],
                        "outer_default": default, "outer_tuned": tuned,
                        "seconds": round(time.perf_counter() - started, 1),
                    }  # fmt: skip
                    print(json.dumps(row), file=sys.stderr, flush=True)
                    rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]], key: str = "ndcg") -> str:
    """model x protocol x dataset: NDCG@10 of each seed with its 95% interval, and the mean over seeds."""
    lines = ["| dataset | protocol | model | NDCG@10 per seed [95% CI] | mean | users |", "|---|---|---|---|---|---|"]
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["protocol"], row["model"]), []).append(row)
    for (dataset, protocol, model), group in groups.items():
        cells = [f"{r[key]:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]" for r in group]
        mean = sum(r[key] for r in group) / len(group)
        lines.append(f"| {dataset} | {protocol} | {model} | {'; '.join(cells)} | {mean:.3f} | {group[0]['users']} |")
    return "\n".join(lines)


def compare(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> str:
    """Before/after table: per (dataset, protocol, model) each seed's NDCG@10 [95% CI], before -> after."""

    def keyed(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
        out: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        for row in rows:
            out.setdefault((row["dataset"], row["protocol"], row["model"]), []).append(row)
        return out

    def cell(group: list[dict[str, Any]]) -> str:
        mean = sum(r["ndcg"] for r in group) / len(group)
        seeds = "; ".join(f"{r['ndcg']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]" for r in group)
        return f"**{mean:.3f}** ({seeds})"

    old, new = keyed(before), keyed(after)
    lines = [
        "| dataset | protocol | model | users | before: mean (per seed [95% CI]) | after: mean (per seed [95% CI]) |",
        "|---|---|---|---|---|---|",
    ]
    for key, group in old.items():
        after_cell = cell(new[key]) if key in new else "(unchanged)"
        lines.append(f"| {' | '.join(key)} | {group[0]['users']} | {cell(group)} | {after_cell} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["evaluate", "tune", "compare"])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--protocols", default=",".join(PROTOCOLS))
    parser.add_argument("--seeds", default="42,7")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--inner", choices=["temporal", "same"], default="temporal")
    parser.add_argument("--params", help="JSON file {model: {param: value}} over the defaults (evaluate)")
    parser.add_argument("--movielens", type=Path, default=MOVIELENS)
    parser.add_argument(
        "--data", action="append", metavar="[NAME=]SPEC",
        help="dataset to use instead of ml-latest-small + synthetic:100k (repeatable): a folder, file or synthetic:N",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    parser.add_argument("files", nargs="*", type=Path, help="compare: BEFORE.json AFTER.json (from evaluate --out)")
    args = parser.parse_args()
    args.models = args.models.split(",")
    args.protocols = args.protocols.split(",")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    if args.command == "compare":
        before, after = (json.loads(path.read_text())["rows"] for path in args.files)
        print(compare(before, after))
        return
    rows = cmd_evaluate(args) if args.command == "evaluate" else cmd_tune(args)
    if args.out:
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1))
    if args.command == "evaluate":
        print(markdown(rows))


if __name__ == "__main__":
    main()
