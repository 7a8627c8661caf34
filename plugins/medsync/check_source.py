"""Check a source without syncing anything: ``python -m medsync.check_source <name>``.

A data engineer adding a source runs this after every edit of its YAML files:

1. the source config and its ``api:`` section are validated (errors name the file, the key path
   and what is wrong);
2. the mapping file is read and the parser is built from both (a mapping that does not feed a
   column the source maps through it is refused);
3. with ``--fetch`` and the source's API connection in the environment
   (``AIRFLOW_CONN_<API_CONN_ID>``), one page of each level is fetched and parsed: what would be
   staged, what would be held back and why, and per A column how many records fill it; for a
   source with a deletion feed, the feed's first page too, per level: how many of its items are
   the level's, how many make tombstones and which are held back and why (a wrong key, version
   or resource path shows here, not after the first sync).

Nothing is written anywhere. Nothing of a record's content is printed (no names, MRNs or dates):
counts, field rules, and the vocabulary values the mapping produced, which are A's codes.
Exit status: 0 when everything checked is fine, 1 when something is refused or held back,
2 on usage errors.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TextIO

from medsync.config import LEVELS, SourceConfig, get_source_config
from medsync.errors import MedsyncError
from medsync.levels import spec, staged_columns
from medsync.mapping import Mapping, load_mapping
from medsync.sources import open_source
from medsync.sources.base import Buckets, DeletionMode, RecordRejected, Source
from medsync.windows import BEGINNING


@dataclass
class FeedSample:
    """What the deletion feed's first page turned into, for one level."""

    page_items: int = 0
    """Items on the page, of every level (the feed is shared)."""
    items: int = 0
    """Items of this level."""
    tombstones: int = 0
    held_back: Counter[str] = field(default_factory=Counter)


@dataclass
class LevelSample:
    """What one page of a level turned into."""

    records: int = 0
    staged: int = 0
    tombstones: int = 0
    held_back: Counter[str] = field(default_factory=Counter)
    filled: Counter[str] = field(default_factory=Counter)
    """A column -> how many staged live records have a value in it."""
    vocabulary: Counter[tuple[str, str]] = field(default_factory=Counter)
    """(A column, A value) -> count, for the columns the mapping file feeds (A's codes, not PHI)."""
    feed: FeedSample | None = None
    """The deletion feed's first page, for a source with one (``DeletionMode.FEED``)."""


def sample_level(source: Source, mapping: Mapping, buckets: Buckets, level: str, since: datetime) -> LevelSample:
    """Fetches the first page of ``level``'s records since ``since``, and of its deletion feed, and parses them."""
    parser = source.parser(mapping, buckets)
    columns = staged_columns(level)
    mapped = {c for entry in mapping.entries(level) for c in entry.columns}
    sample = LevelSample()
    until = datetime.now(UTC)
    with source.connect() as client:
        # The first page is enough to see how records map. With no records, the listing goes on
        # to the feed: its items are sampled below, on their own.
        for page in client.iter_pages(level, since, until):
            if not page.deletions:
                for outcome in parser.parse_page(level, page):
                    _count(sample, outcome, columns, mapped)
            break
        if source.deletion_mode(level) is DeletionMode.FEED:
            # The feed's items come after every record page in a pull: asked for on their own here.
            feed = sample.feed = FeedSample()
            for page in client.iter_deletions(level, since, until):
                feed.page_items = len(page.items) + page.others
                for outcome in parser.parse_page(level, page):
                    feed.items += 1
                    if isinstance(outcome, RecordRejected):
                        feed.held_back[outcome.reason] += 1
                    else:
                        feed.tombstones += 1
                break
    return sample


def _count(sample: LevelSample, outcome: object, columns: Sequence[str], mapped: set[str]) -> None:
    sample.records += 1
    if isinstance(outcome, RecordRejected):
        sample.held_back[outcome.reason] += 1
        return
    sample.staged += 1
    deleted = bool(getattr(outcome, "deleted", False))
    sample.tombstones += deleted
    if deleted:
        return
    for column, value in zip(columns, getattr(outcome, "values", ()), strict=False):
        if value is not None:
            sample.filled[column] += 1
            if column in mapped:
                sample.vocabulary[(column, str(value))] += 1


def print_sample(level: str, sample: LevelSample, out: TextIO) -> None:
    out.write(
        f"  {level}: {sample.records} records: {sample.staged} would be staged ({sample.tombstones} tombstones), "
        f"{sum(sample.held_back.values())} held back" + "\n"
    )
    for reason, n in sample.held_back.most_common():
        out.write(f"    held back x{n}: {reason}" + "\n")
    live = sample.staged - sample.tombstones
    for column in staged_columns(level):
        codes = sorted((v, n) for (c, v), n in sample.vocabulary.items() if c == column)
        shown = f"  ({', '.join(f'{v} x{n}' for v, n in codes)})" if codes else ""
        out.write(f"    {column:<18} filled in {sample.filled[column]} of {live}{shown}" + "\n")
    feed = sample.feed
    if feed is not None:
        out.write(
            f"    deletions feed, first page: {feed.page_items} items, {feed.items} of this level: "
            f"{feed.tombstones} tombstones, {sum(feed.held_back.values())} held back" + "\n"
        )
        for reason, n in feed.held_back.most_common():
            out.write(f"      held back x{n}: {reason}" + "\n")


def check(name: str, *, fetch: bool, days: int, out: TextIO = sys.stdout) -> bool:
    """Runs the checks for source ``name``; True when nothing was refused or held back."""
    cfg: SourceConfig = get_source_config(name)  # validates the config and its api: section
    source = open_source(cfg)
    mapping = load_mapping(cfg.mapping_path)
    buckets = Buckets(cfg.storage.bucket, cfg.storage.resolve_allowed_buckets(lambda _: None))
    source.parser(mapping, buckets)  # refuses a mapping that does not fit the source
    out.write(f"{cfg.dag_id}: config {name}.yaml and mapping {cfg.mapping_file} are valid" + "\n")
    for level in LEVELS:
        link = f", parent by {source.parent_link(level).column}" if spec(level).parent_level else ""
        out.write(f"  {level}: deletions {source.deletion_mode(level)}{link}" + "\n")
    if not fetch:
        return True
    ok = True
    # Never before 1970, as a full refresh (medsync.windows.BEGINNING): sources with epoch
    # bounds refuse negative ones (C: "minimum: 0"), and no record is older.
    since = max(datetime.now(UTC) - timedelta(days=days), BEGINNING)
    out.write(f"first page of each level changed since {since:%Y-%m-%d %H:%M} UTC (nothing is written):" + "\n")
    feeds: list[FeedSample] = []
    for level in LEVELS:
        sample = sample_level(source, mapping, buckets, level, since)
        print_sample(level, sample, out)
        ok &= not sample.held_back
        if sample.feed is not None:
            ok &= not sample.feed.held_back
            feeds.append(sample.feed)
    if feeds and not any(feed.items for feed in feeds) and any(feed.page_items for feed in feeds):
        # Items, but none of any level: the config names the items' resource, or where it is, wrongly.
        out.write(
            f"  deletions feed: none of the first page's {max(feed.page_items for feed in feeds)} items is of "
            f"a level's resource: check the feed's resource names and the path to them" + "\n"
        )
        ok = False
    if source.has_counts:
        with source.connect() as client:
            counts = client.counts() or {}
        out.write("  live counts: " + ", ".join(f"{level} {counts.get(level)}" for level in LEVELS) + "\n")
    return ok


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medsync.check_source", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="the source's name (include/sources/<name>.yaml)")
    parser.add_argument("--fetch", action="store_true", help="fetch and parse one page of each level")
    parser.add_argument("--days", type=int, default=36500, help="how far back the sampled window starts")
    args = parser.parse_args(argv)
    try:
        return 0 if check(args.source, fetch=args.fetch, days=args.days) else 1
    except MedsyncError as exc:
        sys.stderr.write(f"refused: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
