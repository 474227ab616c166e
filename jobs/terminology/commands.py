"""``affluent mapping coverage`` and ``affluent mapping remap``: thin clients of the terminology jobs."""

from __future__ import annotations

import argparse
import json


def _coverage(args: argparse.Namespace) -> int:
    from pyspark.sql import functions as F

    from jobs.stages import pipeline
    from jobs.core.tables import table_exists
    from jobs.terminology.coverage import MEASURED_DATASETS, coverage, render

    ctx = pipeline.Context.from_env()
    min_cell = ctx.consortium.pipeline.min_cell_size
    found = []
    for dataset in [args.dataset] if args.dataset else MEASURED_DATASETS:
        path = ctx.lake.silver(dataset)
        if not table_exists(ctx.spark, path):
            continue
        silver = ctx.spark.read.format("delta").load(path)
        if args.establishment:
            silver = silver.where(F.col("establishment_id") == args.establishment)
        found += coverage(silver, dataset, min_cell, args.top)
    if args.json:
        print(json.dumps([dict(c.__dict__, row_share=c.row_share, value_share=c.value_share) for c in found]))
    else:
        print(render(sorted(found, key=lambda c: (c.establishment_id, c.dataset)), min_cell))
    return 0


def _remap(args: argparse.Namespace) -> int:
    from jobs.stages import pipeline
    from jobs.terminology.remap import remap_silver

    ctx = pipeline.Context.from_env()
    print(json.dumps(remap_silver(ctx.spark, ctx.lake, ctx.consortium.terminology)))
    return 0


def add_mapping_commands(sub) -> None:
    mapping = sub.add_parser("mapping", help="Terminology: coverage of the concept maps, remap of silver")
    actions = mapping.add_subparsers(dest="action", required=True, metavar="ACTION")
    cov = actions.add_parser("coverage", help="Share of rows and distinct source values mapped to standard "
                                              "concepts, per establishment and dataset; most frequent unmapped")
    cov.add_argument("--establishment")
    cov.add_argument("--dataset", choices=("patient", "encounter", "diagnosis", "lab_result", "medication"))
    cov.add_argument("--top", type=int, default=10, help="unmapped values shown per establishment and dataset")
    cov.add_argument("--json", action="store_true")
    cov.set_defaults(func=_coverage)
    remap = actions.add_parser("remap", help="Re-derive silver's concept columns from config/terminology/ "
                                             "(after a map changed; no re-ingest)")
    remap.set_defaults(func=_remap)
