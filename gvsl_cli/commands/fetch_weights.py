"""``gvsl fetch-weights``: list, download, load and verify the pretrained weights of the manifest.

With several names, a failure is reported on its own line and the others are still
fetched; the exit code is then 7 when some succeeded and 4 when none did (conventions.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer


def register(app: typer.Typer) -> None:
    app.command("fetch-weights")(fetch_weights)


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size else "?"


def _list(manifest, names: list[str], as_json: bool) -> None:
    from gvsl_cli.commands.output import table_console
    from rich.table import Table

    from gvsl_cli.weights import HASH_PINNED, cached_name_target, cached_name_targets, entry_target

    if names:
        chosen = [(name, cached_name_target(name)) for name in names if name not in manifest.entries]
        unknown = [name for name, target in chosen if target is None]
        if unknown:
            raise manifest.unknown(unknown[0])
        entries = [manifest.entries[name] for name in names if name in manifest.entries]
        unlisted = chosen
    else:
        entries, unlisted = list(manifest.entries.values()), cached_name_targets(manifest)
    table = Table(title="weights in " + ", ".join(str(p) for p in manifest.paths))
    table.add_column("name", no_wrap=True)
    for column in ("size", "format", "modality", "cached", "hash"):
        table.add_column(column)
    table.add_column("licence", overflow="fold")
    for entry in entries:
        target = entry_target(entry)
        cached = target.path.is_file()
        size = entry.size or (target.path.stat().st_size if cached else 0)
        _, source = target.expected_hash()
        if entry.has_hash:
            hash_state = "manifest"
        elif source is None:
            hash_state = "none"
        else:  # a pin, or the hash the file was verified against when fetched (another manifest's)
            hash_state = "pinned" if source == HASH_PINNED else "record"
        if as_json:
            row = {"name": entry.name, "bytes": size or None, "format": entry.format, "width": entry.width, "modality": entry.modality,
                   "cached": cached, "path": str(target.path), "hash": hash_state, "licence": entry.licence}
            typer.echo(json.dumps(row))
        table.add_row(entry.name, _megabytes(size), f"{entry.format} w{entry.width}", entry.modality, "yes" if cached else "no", hash_state, entry.licence)
    # Files fetched under a name no manifest given now lists (fetch-weights --manifest X NAME):
    # usable as --weights NAME through their record; format and licence are the manifest's to say.
    for name, target in unlisted:
        size = target.path.stat().st_size
        if as_json:
            typer.echo(json.dumps({"name": name, "bytes": size, "format": None, "width": None, "modality": None,
                                   "cached": True, "path": str(target.path), "hash": "record", "licence": None}))
        table.add_row(name, _megabytes(size), "-", "-", "yes", "record", "(in the cache; no manifest lists it)")
    if not as_json:
        table_console().print(table)


def _verify(manifest, names: list[str], as_json: bool) -> None:
    from gvsl_cli.commands.output import table_console
    from rich.table import Table

    from gvsl_cli.errors import WeightsError
    from gvsl_cli.weights import cached_name_target, cached_name_targets, cached_url_targets, entry_target, is_url, url_target, verify

    def named(name: str):
        if is_url(name):
            return url_target(name)  # without #sha256=, the record's hash (what it was fetched with)
        if name in manifest.entries:
            return entry_target(manifest.entries[name])
        return cached_name_target(name) or entry_target(manifest.get(name))

    if names:
        targets = [(name, named(name)) for name in names]
    else:  # everything in the cache
        targets = [(e.name, entry_target(e)) for e in manifest.entries.values() if entry_target(e).path.is_file()]
        targets += cached_name_targets(manifest)
        targets += [(t.label, t) for t in cached_url_targets()]
    table = Table("weights", "status", "sha256", "file")
    words = {"ok": "ok", "missing": "not cached", "unpinned": "no known hash", "deleted": "MISMATCH: deleted", "mismatch": "MISMATCH: read-only cache, kept"}
    deleted, kept = [], []
    for label, target in targets:
        result = verify(target)
        if as_json:
            typer.echo(json.dumps({"name": label, "status": result.status, "sha256": result.sha256 or None, "path": str(result.path)}))
        table.add_row(label, words[result.status], result.sha256 or "-", str(result.path))
        if result.status in ("deleted", "mismatch"):
            (deleted if result.status == "deleted" else kept).append(f"{label} (expected {result.expected}, got {result.sha256})")
    if not as_json:
        table_console().print(table if targets else "nothing in the cache to verify")
    if kept:
        raise WeightsError(
            "sha256 mismatch in a read-only cache (not deleted): " + "; ".join(kept + deleted),
            hint="ask whoever maintains the cache to run gvsl fetch-weights --verify with write access",
        )
    if deleted:
        raise WeightsError(
            "sha256 mismatch, the damaged cached files were deleted: " + "; ".join(deleted),
            hint="run gvsl fetch-weights NAME to download them again (with the manifest that lists NAME)",
        )


def fetch_weights(
    names: Optional[List[str]] = typer.Argument(None, help="Manifest names (or http(s) URLs) to fetch or verify.", show_default=False),
    all_entries: bool = typer.Option(False, "--all", help="Fetch every entry of the manifest."),
    list_entries: bool = typer.Option(False, "--list", help="Show the manifest's entries and whether each is cached (and cached weights fetched with another manifest)."),
    force: bool = typer.Option(False, "--force", help="Download again even if the cached file is good."),
    verify_cache: bool = typer.Option(False, "--verify", help="Re-hash cached files (the named ones, or all); delete those that do not match."),
    manifest_file: Optional[Path] = typer.Option(None, "--manifest", help="A user manifest added to the built-in one (default: $GVSL_MANIFEST).", show_default=False),
    trust_unverified: bool = typer.Option(
        False, "--trust-unverified", help="Download entries without a known sha256 anyway, print the hash received and pin it (also: GVSL_TRUST_UNVERIFIED=1)."
    ),
    as_json: bool = typer.Option(False, "--json", help="With --list or --verify: one JSON object per entry on stdout instead of the table."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or waiting/retry notices; warnings, errors and the result lines on stdout stay."),
) -> None:
    """Download pretrained weights into the cache, verified by sha256 (GVSL_HOME, GVSL_OFFLINE: see docs/weights.md)."""
    from rich.console import Console

    from gvsl_cli.download import ConsoleReporter, env_flag
    from gvsl_cli.errors import ConfigError, GvslError, IncompleteError, WeightsError
    from gvsl_cli.manifest import load_manifest
    from gvsl_cli.weights import OFFLINE_ENV, TRUST_ENV, is_url, open_name, open_url

    names = list(names or [])
    modes = [flag for flag, on in (("--list", list_entries), ("--verify", verify_cache), ("--all", all_entries)) if on]
    if len(modes) > 1:
        raise ConfigError(f"{' and '.join(modes)} cannot be combined")
    if all_entries and names:
        raise ConfigError("give weights names or --all, not both")
    if as_json and not (list_entries or verify_cache):
        raise ConfigError("--json applies to --list and --verify (downloads print one tab-separated line each)")
    if force and (list_entries or verify_cache):
        raise ConfigError("--force applies to downloads, not to --list or --verify")
    if not (names or modes):
        raise ConfigError("nothing to do", hint="give weights names, --all, --list or --verify (see gvsl fetch-weights --help)")

    manifest = load_manifest(manifest_file)
    if list_entries:
        _list(manifest, names, as_json)
        return
    if verify_cache:
        _verify(manifest, names, as_json)
        return

    options = dict(
        force=force,
        trust_unverified=trust_unverified or env_flag(TRUST_ENV),
        offline=env_flag(OFFLINE_ENV),
        reporter=ConsoleReporter(quiet=quiet),
    )
    targets = list(manifest.entries) if all_entries else names
    errors = Console(stderr=True, soft_wrap=True, highlight=False)
    failed = []
    for name in targets:
        try:
            # Loaded as a command would load it, so an unusable file fails here (exit 3), not in a job.
            fetched, _ = open_url(name, **options) if is_url(name) else open_name(name, manifest, **options)
        except GvslError as exc:
            if len(targets) == 1:
                raise
            errors.print(f"error: {name}: {exc}" + (f" (hint: {exc.hint})" if exc.hint else ""), markup=False)
            failed.append(name)
            continue
        state = "downloaded" if fetched.downloaded else "cached"
        typer.echo(f"{name}\t{fetched.path}\tsha256={fetched.sha256}\t{fetched.size} bytes\t{state} ({fetched.hash_source} hash)")
    if failed:
        # conventions.md: 7 when some of many inputs failed and the others were done; 4 when none was.
        error = IncompleteError if len(failed) < len(targets) else WeightsError
        raise error(f"{len(failed)} of {len(targets)} weights could not be fetched: {', '.join(failed)}")
