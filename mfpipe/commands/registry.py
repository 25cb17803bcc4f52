"""The commands on the registered models: `recommend`, `similar`, `champion`, `promote`, `prune`, `serve`.

Each is a plain function; `mfpipe.cli` registers it on the app. Heavy imports stay inside the functions.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from mfpipe.auth import mask_uri
from mfpipe.commands.options import (
    ConfigFile,
    DatasetOpt,
    HowMany,
    JsonOpt,
    registered_model,
)
from mfpipe.errors import MfpipeError


# -- recommend --
def recommend(
    user: Annotated[str, typer.Option("--user", help="External user id.")],
    items: Annotated[
        str | None, typer.Option("--items", help="Item ids since training (a,b,c): folded in and excluded.")
    ] = None,
    k: HowMany = 10,
    dataset: DatasetOpt = None,
    json_: JsonOpt = False,
    config: ConfigFile = None,
) -> None:
    """Top-k items for a user from the `champion` (`--items` folded in; popularity for a user it never saw)."""
    import json

    from mfpipe import serving

    store, name = registered_model(dataset, config)
    new = None if items is None else [i.strip() for i in items.split(",") if i.strip()]
    frame, source = serving.recommend_for(serving.champion_version_uri(store, name), user, k, new)
    if json_:
        rows = frame.drop(columns="user_id").to_dict(orient="records")
        document = {"user_id": user, "registered_model": name, "k": k, "source": source, "items": rows}
        typer.echo(json.dumps(document))
        return
    if source == "popularity":
        typer.echo(f"popularity fallback: {name} has never seen user {user!r} (and no known --items)")
    elif source == "fold-in":
        typer.echo(f"fold-in: user {user!r} with {len(new or [])} new item(s)")
    for row in frame.itertuples():
        title = f"  {row.title}" if row.title else ""
        typer.echo(f"{row.rank:>3}. {row.item_id}  {row.score:.4f}{title}")


def similar(
    item: Annotated[str, typer.Option("--item", help="External item id.")],
    k: HowMany = 10,
    dataset: DatasetOpt = None,
    json_: JsonOpt = False,
    config: ConfigFile = None,
) -> None:
    """Nearest items to an item by cosine in the `champion`'s item factors (the item itself excluded)."""
    import json

    from mfpipe import serving

    store, name = registered_model(dataset, config)
    uri = serving.champion_version_uri(store, name)
    frame = serving.similar_items(serving.load_pyfunc(uri), uri, item, k)
    if json_:
        rows = frame.to_dict(orient="records")
        typer.echo(json.dumps({"item_id": item, "registered_model": name, "k": k, "items": rows}))
        return
    for row in frame.itertuples():
        title = f"  {row.title}" if row.title else ""
        typer.echo(f"{row.rank:>3}. {row.item_id}  {row.score:.4f}{title}")


# -- champion --
def champion(dataset: DatasetOpt = None, json_: JsonOpt = False, config: ConfigFile = None) -> None:
    """Show the `champion` (and `challenger`) of a dataset's registered model with their lineage."""
    import json

    from mfpipe import tracking

    store, name = registered_model(dataset, config)
    with tracking.tracking_errors(store):
        shown = {a: tracking.alias_version(store, name, a) for a in (tracking.CHAMPION, tracking.CHALLENGER)}
    if shown[tracking.CHAMPION] is None:
        raise MfpipeError(f"{name}: no champion yet in {mask_uri(store.uri)} (run `mfpipe run` first)")
    if json_:
        typer.echo(json.dumps({"registered_model": name, **{a: _version_json(v) for a, v in shown.items()}}))
        return
    for alias, version in shown.items():
        if version is not None:
            typer.echo(f"{alias}: {name} v{version.version} (run {version.run_id})")
            for key, value in sorted(version.tags.items()):
                typer.echo(f"  {key}: {value}")


def _version_json(version: Any) -> dict[str, Any] | None:
    """A registered version for `champion --json`: its ids, model, warm-user metrics and every tag.

    Versions carry their metrics as tags under MLflow keys (`ndcg_at_10`, variants `_all`/`_cold`);
    `metrics` holds the warm-user ones (the promotion's) as numbers under the names the run report uses
    (`ndcg@10`); `tags` keeps every tag verbatim (strings), variants and lineage included.
    """
    import re

    from mfpipe.evaluation import METRICS, display_name

    if version is None:
        return None
    warm = re.compile(rf"^(?P<name>{'|'.join(METRICS)})_at_(?P<k>\d+)$")
    metrics = {display_name(m["name"], int(m["k"])): float(value)
               for key, value in sorted(version.tags.items()) if (m := warm.match(key))}  # fmt: skip
    return {"version": version.version, "run_id": version.run_id, "model": version.tags.get("model"),
            "metrics": metrics, "tags": dict(sorted(version.tags.items()))}  # fmt: skip


# -- promote --
def promote(
    version: Annotated[str | None, typer.Option("--version", help="Make this version the champion.")] = None,
    rollback: Annotated[bool, typer.Option("--rollback", help="Back to the previous champion.")] = False,
    reason: Annotated[str, typer.Option("--reason", help="Why (recorded on the version).")] = "",
    dataset: DatasetOpt = None,
    json_: JsonOpt = False,
    config: ConfigFile = None,
) -> None:
    """Move `champion` by hand (`--version N` or `--rollback`); the reason is recorded."""
    import json

    from mfpipe.promotion import set_champion_by_hand

    if (version is None) == (not rollback):
        raise MfpipeError("give exactly one of --version N or --rollback")
    store, name = registered_model(dataset, config)
    decision = set_champion_by_hand(store, name, version, reason, rollback=rollback)
    if json_:
        moved = {"before": {"version": decision.before_version}, "after": {"version": decision.after_version}}
        typer.echo(json.dumps({"registered_model": name, **moved, "reason": decision.reason}))
        return
    typer.echo(f"champion of {name}: v{decision.before_version} -> v{decision.after_version} ({decision.reason})")


# -- prune --
def prune(
    keep: Annotated[int, typer.Option("--keep", help="How many of the newest versions stay (at least 1).")],
    yes: Annotated[bool, typer.Option("--yes", help="Delete; without it, only list what would be deleted.")] = False,
    dataset: DatasetOpt = None,
    json_: JsonOpt = False,
    config: ConfigFile = None,
) -> None:
    """Delete registered versions beyond the N newest, with their model files; never one an alias points at."""
    import json

    from mfpipe import retention

    store, name = registered_model(dataset, config)
    result = retention.prune(store, name, keep, apply=yes)
    if json_:
        typer.echo(json.dumps(result.to_json()))
        return
    typer.echo(f"{name}: keeping the {keep} newest: {', '.join(f'v{v}' for v in result.kept) or 'none'}")
    for version, why in result.spared.items():
        typer.echo(f"  kept v{version}: {why}")
    verb = "deleted" if yes else "would delete"
    for v in result.versions:
        files = v.artifacts or "its files stay (a version that stays shares them)"
        typer.echo(f"  {verb} v{v.version} ({v.model or 'model ?'}, run {v.run_id}): {files}")
    if not result.versions:
        typer.echo("nothing to delete")
    elif yes:
        typer.echo(f"deleted {len(result.versions)} version(s) and their model files")
    else:
        typer.echo(f"dry run, nothing deleted: add --yes to delete these {len(result.versions)} version(s)")


# -- serve --
def serve(
    dataset: DatasetOpt = None,
    port: Annotated[int, typer.Option("--port", help="Port on 127.0.0.1.")] = 5001,
    config: ConfigFile = None,
) -> None:
    """Serve the champion over HTTP on 127.0.0.1 (POST /invocations, MLflow's request and answer format).

    The version is read from its `.npz` artifacts and answered by the installed code, never by running
    what the registry holds; on a host without mfpipe, `mlflow models serve -m models:/NAME@champion` works.
    """
    from mfpipe import http_server, serving

    store, name = registered_model(dataset, config)
    uri = serving.champion_version_uri(store, name)
    server = http_server.make_server(serving.load_recommendations(uri), port)
    typer.echo(f"Serving {uri} on http://127.0.0.1:{port}/invocations (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
