"""The canonical schema and the rules a batch can hit, as one Markdown reference generated from the code.

``docs/schema-reference.md`` is written by ``affluent schema reference`` from
:mod:`jobs.core.schemas` (datasets, columns, types), the silver column comments of
:mod:`jobs.stages.land`, the suites under ``expectations/`` (row and batch rules with
their reasons) and the readers' ingest rules; a test fails when the committed
page differs from what the code generates, so the page cannot fall behind.

Example::

    affluent schema reference --out docs/schema-reference.md   # regenerate
    affluent schema reference --check                          # exit 1 when out of date
"""

from __future__ import annotations

import json
from pathlib import Path

from jobs.core.schemas import BRONZE_COLUMNS, DATASETS, IDENTIFYING_COLUMNS, RECORD_REF, SILVER_KEY, SILVER_SCHEMAS

REFERENCE_PATH = Path(__file__).resolve().parents[2] / "docs" / "schema-reference.md"
SUITES_DIR = Path(__file__).resolve().parents[2] / "expectations"

# How pseudonymisation reads each source column that is not plain text (jobs.stages.pseudonymise.Parser):
# a CSV profile's ``date_format`` / ``datetime_format`` / ``decimal_separator``; FHIR is ISO 8601.
DATE = "date: `date_format`, or `datetime_format` (the date is kept)"
DATE_ONLY = "date: `date_format` only"
DATETIME = "date and time: `datetime_format`, or `date_format` (midnight)"
NUMBER = "number: `decimal_separator`"
SOURCE_FORMATS: dict[tuple[str, str], str] = {
    ("patient", "birth_date"): DATE_ONLY + " (kept as year and month)",
    ("patient", "deceased_date"): "presence only (`is_deceased`); the date is not kept",
    ("encounter", "visit_start"): DATETIME,
    ("encounter", "visit_end"): DATETIME,
    ("diagnosis", "condition_date"): DATE,
    ("diagnosis", "condition_end_date"): DATE,
    ("lab_result", "measured_at"): DATETIME,
    ("lab_result", "value"): NUMBER + "; a qualitative result is kept as text; with `value_system`, a coded "
                              "answer (`value_as_concept`), never a number",
    ("lab_result", "value_system"): "code system of a coded answer (FHIR valueCodeableConcept)",
    ("observation", "observed_at"): DATETIME,
    ("observation", "value"): NUMBER + "; a word only when one of the profile's `observations.answers` (other "
                              "text is dropped and counted); with `value_system`, a coded answer",
    ("observation", "value_system"): "code system of a coded answer (FHIR valueCodeableConcept)",
    ("observation", "category"): "Observation.category code (social-history, survey…); routes rows with "
                                 "`observations.categories`",
    ("medication", "start_date"): DATE,
    ("medication", "end_date"): DATE,
    ("medication", "dispense_date"): DATE,
    ("medication", "dose"): NUMBER,
    ("consent", "decision_date"): DATE,
    ("consent", "valid_from"): DATE_ONLY,
    ("consent", "valid_until"): DATE_ONLY,
}

# What each rule means for the establishment's data and what fixes it. Row rules quarantine the row
# (the rest goes on); batch rules and rejections stop the batch, and its establishment's later ones.
RULE_FIXES: dict[str, tuple[str, str]] = {
    "landing.rejected": (
        "The delivery breaks the landing contract (manifest, file missing, sha256, row count, a CR inside a "
        "line, unknown dataset, a header that differs from the profile). Nothing is ingested.",
        "Re-delivery is enough for a delivery fault: the establishment delivers the batch again with corrected "
        "files and `manifest.json`; a changed manifest is taken again by itself. When the profile is at fault "
        "(a header renamed on purpose), fix `config/establishments/<id>.yaml`, then `affluent batch retry`."),
    "ingest.encoding": (
        "A line holds bytes that are not valid in the profile's `encoding`.",
        "Check the profile's `encoding` (latin-1, utf-8, utf-8-sig); if it is right, the establishment "
        "re-exports the file with valid bytes."),
    "ingest.encoding_mismatch": (
        "UTF-8 multi-byte sequences in a file declared single-byte (latin-1): read as latin-1 they would "
        "change identifiers and so pseudonyms.",
        "Set `encoding: utf-8` in the profile if the export is UTF-8; otherwise the establishment re-exports "
        "in latin-1."),
    "ingest.malformed_line": (
        "A CSV record with more or fewer fields than the header, or unbalanced quotes; a FHIR line or entry "
        "that is not a JSON object.",
        "Check `delimiter` and `quote` in the profile; otherwise the establishment fixes its export."),
    "ingest.unknown_action": (
        "The action column holds a value the profile's `action_values` does not map.",
        "Add the value to `action_values` (upsert or delete)."),
    "ingest.field_too_long": (
        "A field longer than `max_field_bytes` (1 MiB by default).",
        "Raise the profile's `max_field_bytes` (at most 8 MiB) if such fields are expected; free text is "
        "never landed anyway."),
    "ingest.unmapped_resource": (
        "A FHIR resource that cannot be mapped: no resourceType, a type under the wrong file, no id, a "
        "patient reference missing, an Observation without any coding (text only), a value of a type its "
        "dataset cannot hold (a Range, a Period; a date as an observation's answer), or an Observation whose "
        "every coded fact is free text. Observations are routed per resource: LOINC-coded ones to "
        "`lab_result`, SNOMED CT observables, survey and social-history ones (and the profile's "
        "`observations.codes`) to `observation`. The free-text-component rule: free "
        "text never lands and is dropped at the smallest unit: a coded component whose value is "
        "`valueString` (a PRAPARE panel's address question) is left out and counted in the batch log's "
        "message while its coded siblings land, unless the string is one of the profile's "
        "`observations.answers`; only a resource left with no coded fact is quarantined.",
        "Nothing to fix in the profile when the text is free text: the row is accounted for in quarantine. "
        "Otherwise the reason names the element: the establishment fixes the resource."),
    "completeness.required": (
        "A column the dataset cannot do without is empty (record key, person, code, start date…).",
        "Map the source column in the profile's `columns` (or `derived_ids` for a record key); if it is "
        "mapped, the establishment fills it."),
    "conformance.date": (
        "A date or date-time did not parse with the profile's `date_format` / `datetime_format` (see "
        "\"Source columns\" for which column takes which).",
        "Fix `date_format` / `datetime_format` (Spark datetime patterns: `dd/MM/yyyy`, `MM/dd/yyyy HH:mm`)."),
    "conformance.number": (
        "A number did not parse with the profile's `decimal_separator`.",
        "Fix `decimal_separator` (`.` or `,`)."),
    "conformance.code": (
        "A code is not well formed for its system (pattern or check digit), its system is unknown, or an "
        "action, decision or observation category is not one of the canonical values; an observation's code, "
        "category or coded answer that is not a code token (text where a code belongs). Visit reason codes "
        "are checked like diagnosis codes.",
        "Map the system with `constants` or `value_maps` (an establishment's own category words with "
        "`value_maps.category`: `{Biochimie: laboratory}`); a malformed code is the establishment's to fix."),
    "conformance.coded_field": (
        "A code, unit, care site or type holds a value outside its vocabulary: not UCUM (annotations "
        "only when declared), not a care site the establishment lists, not a word of the concept maps or "
        "the profile. The value may be a name or an address: it was masked (kind and length only) before "
        "staging, and the reason names the column, never the value.",
        "A legitimate value is declared: `care_sites` or `coded_values` in "
        "`config/establishments/<id>.yaml`, or a concept map under `config/terminology/`; then "
        "`affluent batch retry`. Anything else is the establishment's to correct at the source."),
    "plausibility.future_date": (
        "A date after the batch's `extracted_at`: an event cannot be recorded before it happens (a time "
        "zone or day/month inversion is the usual cause).",
        "Check `date_format` (day and month swapped?) and the manifest's `extracted_at` (with its time "
        "zone); otherwise the establishment corrects the record."),
    "plausibility.date_order": (
        "An end before its start (an encounter's, a condition's, a medication's, a consent's validity), a "
        "medication dispensed after it ended, or an encounter before the patient's year of birth.",
        "Check that start and end are mapped the right way round in `columns`; otherwise the establishment "
        "corrects the record."),
    "plausibility.range": (
        "A lab value outside the plausible bounds of its LOINC code, in the bound's unit.",
        "Check the unit column's mapping and `decimal_separator`; a value truly out of range stays in "
        "quarantine."),
    "integrity.unique_key": (
        "One record key appears more than once in a batch with different content: neither version can be "
        "trusted to be the latest, so every row carrying it is quarantined.",
        "For files without row ids: `derived_id_sequence` when same-time repeats are distinct records (two "
        "measurements in one second), or a value column added to `derived_ids` (docs/onboarding.md says when "
        "to use which)."),
    "integrity.patient_ref": (
        "The record's patient reference matches no patient of the establishment.",
        "Deliver the patient file with the facts (or before them); check the patient reference mapping."),
    "batch.row_count_drop": (
        "A full batch with fewer rows than the previous landed full batch, beyond `max_row_count_drop_pct`.",
        "If the drop is real, raise the threshold for the establishment (`batch_rules`) and `affluent batch "
        "retry`; otherwise the establishment re-delivers the full extract."),
    "batch.quarantined_rate": (
        "More than `max_quarantined_pct` of a dataset's rows quarantined (from 20 rows read).",
        "Read the quarantine's rules: most often a wrong `date_format` or `decimal_separator`; fix the "
        "profile, then `affluent batch retry`."),
    "batch.column_change": (
        "The staged columns differ from silver's (the schema changed).",
        "Migrate silver to the new schema first; nothing lands until they agree."),
    "batch.mapped_share": (
        "Fewer than `min_mapped_pct` of a dataset's rows with a source value got a standard concept "
        "(from 20 rows read): the establishment sends codes or words the concept maps do not know.",
        "Run `affluent mapping coverage` to see the most frequent unmapped values; add them to the "
        "establishment's ConceptMap override under `config/terminology/<establishment>/` (or the consortium's "
        "map), check it with `affluent config check`, then `affluent batch retry`."),
    "onboarding.held": (
        "The establishment is onboarding (`onboarding: true`) and its current profile is not accepted.",
        "Read the validation report and the quarantine, then `affluent onboarding accept <id> --reason …`."),
}


def _suite_rules() -> dict[str, list[tuple[str, str, str]]]:
    """rule -> [(dataset, kind, reason)] from every suite under ``expectations/``."""
    rules: dict[str, list[tuple[str, str, str]]] = {}
    for path in sorted(SUITES_DIR.glob("*.json")):
        suite = json.loads(path.read_text(encoding="utf-8"))
        for expectation in suite["expectations"]:
            meta = expectation.get("meta") or {}
            if "rule" in meta:
                rules.setdefault(meta["rule"], []).append((path.stem, meta.get("kind", ""), meta.get("reason", "")))
    return rules


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_reference() -> str:
    """The Markdown page, deterministic (same code, same bytes)."""
    from jobs.stages.land import TABLE_COMMENTS, column_comment

    lines = [
        "# Canonical schema and rules reference",
        "",
        "Generated by `affluent schema reference` from `jobs/core/schemas.py`, the silver column comments",
        "(`jobs/stages/land.py`), the suites in `expectations/` and the readers' rules. Do not edit by hand:",
        "change the code, then regenerate (a test fails while this page is out of date).",
        "",
        "## Silver datasets",
        "",
        "Every table is partitioned by `establishment_id`; its record key is unique within an establishment.",
        "",
    ]
    for dataset in DATASETS:
        lines += [f"### `{dataset}`", "", _cell(TABLE_COMMENTS.get(dataset, "")), "",
                  f"Record key: `{SILVER_KEY[dataset]}`.", "",
                  "| column | type | nullable | description |", "|---|---|---|---|"]
        for f in SILVER_SCHEMAS[dataset].fields:
            lines.append(f"| `{f.name}` | {f.dataType.simpleString()} | {'yes' if f.nullable else 'no'} | "
                         f"{_cell(column_comment(dataset, f.name))} |")
        lines.append("")
    lines += [
        "## Source columns",
        "",
        "What a profile maps source headers (CSV) to, per dataset: every value is read as text, then",
        "typed at pseudonymisation. The format column says which profile setting parses it; FHIR values",
        "are ISO 8601 and need none. Identifying columns never leave bronze.",
        "",
    ]
    for dataset in DATASETS:
        lines += [f"### `{dataset}`", "", "| column | format | note |", "|---|---|---|"]
        for column in BRONZE_COLUMNS[dataset]:
            notes = []
            if column == RECORD_REF[dataset]:
                notes.append("record id (keyed per establishment); `derived_ids` can build it")
            if column in IDENTIFYING_COLUMNS:
                notes.append("identifying: bronze only")
            if column == "record_action":
                notes.append("upsert or delete (`action_values`, `default_action`)")
            fmt = SOURCE_FORMATS.get((dataset, column), "text")
            lines.append(f"| `{column}` | {_cell(fmt)} | {_cell('; '.join(notes))} |")
        lines.append("")
    suites = _suite_rules()
    lines += [
        "## Rules a batch can hit",
        "",
        "Row rules (`kind` row) quarantine the row with the rule and a reason; the rest of the batch goes",
        "on. Batch rules, rejections and holds stop the batch and every later batch of its establishment",
        "until it is fixed (`affluent batches` says which and how).",
        "",
        "| rule | stops | what it means | fix | reasons given (dataset) |",
        "|---|---|---|---|---|",
    ]
    for rule, (meaning, fix) in RULE_FIXES.items():
        found = suites.get(rule, [])
        stops = "batch" if rule.startswith(("batch.", "landing.", "onboarding.")) else "row"
        reasons = "; ".join(dict.fromkeys(f"{reason} ({dataset})" for dataset, _, reason in found))
        lines.append(f"| `{rule}` | {stops} | {_cell(meaning)} | {_cell(fix)} | {_cell(reasons)} |")
    return "\n".join(lines).rstrip() + "\n"


def write_reference(path: Path = REFERENCE_PATH) -> Path:
    path.write_text(render_reference(), encoding="utf-8")
    return path


def is_current(path: Path = REFERENCE_PATH) -> bool:
    return path.is_file() and path.read_text(encoding="utf-8") == render_reference()
