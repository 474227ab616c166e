"""Standard concepts beside the source values: DataFrame → DataFrame, from silver's own columns.

:func:`with_concepts` adds (or replaces) a dataset's standard columns
(:data:`jobs.core.schemas.CONCEPT_FIELDS`) from its source columns only, so land
derives them for a batch and the remap maintenance task re-derives them for
the whole of silver with the same code:

- ``patient``: ``gender_concept_id`` (OMOP 8507 male, 8532 female, 0);
- ``encounter``: ``visit_concept_id`` (OMOP 9201 inpatient, 9202 outpatient, 9203 emergency, 0);
- ``diagnosis``: ``condition_concept_code``, the WHO ICD-10 category: by rule
  from ICD-10, ICD-10-CA and ICD-10-CM (the first three characters), by map
  from SNOMED CT;
- ``medication``: ``drug_concept_code``, the ATC level-5 substance: an ATC
  level-5 code itself by rule, DIN and RxNorm by map;
- ``lab_result``: ``value_as_number`` in the canonical UCUM unit of its LOINC
  code (``unit_concept_code``), the number as sent kept in
  ``value_source_as_number`` and its unit in ``unit_source_value``.

Each row records in ``*_concept_map`` the map (``<id>|<version>``) or rule that
gave its concept. A value nothing maps gets concept ``0`` and keeps its row.
An establishment's map wins over the consortium's, which wins over a rule.
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from jobs.terminology.maps import DOMAIN_OF_DATASET, NO_CONCEPT, RULES, Domain, Terminology

LAB_DATASET = "lab_result"
LAB_CONCEPT_COLUMNS = ("value_as_number", "value_source_as_number", "unit_concept_code", "measurement_concept_map")


def _source_key(domain: Domain) -> Column:
    value = F.trim(F.col(domain.source_column))
    return F.lower(value) if domain.case == "lower" else F.upper(value)


def _rule(domain: Domain) -> Column:
    """The standard concept a rule gives, where one applies (null otherwise)."""
    code = F.upper(F.trim(F.col(domain.source_column)))
    if domain.vocabulary_column is None:  # the rules read the code's vocabulary
        return F.lit(None).cast("string")
    if domain.name == "condition":
        category = F.substring(F.regexp_replace(code, r"\.", ""), 1, 3)
        icd10 = F.col(domain.vocabulary_column).isin("ICD10", "ICD10CA", "ICD10CM")
        return F.when(icd10 & code.rlike(r"^[A-Z][0-9]{2}"), category)
    if domain.name == "drug":
        return F.when((F.col(domain.vocabulary_column) == "ATC") & code.rlike(domain.target_pattern), code)
    return F.lit(None).cast("string")


def _entries(df: DataFrame, domain: Domain, terminology: Terminology, establishment: bool, prefix: str) -> DataFrame:
    rows = [(e.establishment or "", e.vocabulary or "", e.code, e.concept, e.map_ref)
            for e in terminology.entries_for(domain.name) if (e.establishment is not None) == establishment]
    schema = (f"{prefix}est string, {prefix}vocabulary string, {prefix}code string, {prefix}concept string, "
              f"{prefix}ref string")
    return df.sparkSession.createDataFrame(rows, schema)


def map_concepts(df: DataFrame, domain: Domain, terminology: Terminology) -> DataFrame:
    """``df`` plus the domain's concept and map columns (replaced when present)."""
    base = df.drop(domain.concept_column, domain.map_column)
    keyed = base.withColumn("_t_key", _source_key(domain)).withColumn(
        "_t_vocabulary", F.coalesce(F.col(domain.vocabulary_column), F.lit("")) if domain.vocabulary_column
        else F.lit(""))
    local = _entries(df, domain, terminology, True, "_e_")
    shared = _entries(df, domain, terminology, False, "_c_")
    joined = (keyed
              .join(F.broadcast(local), (F.col("establishment_id") == F.col("_e_est"))
                    & (F.col("_t_vocabulary") == F.col("_e_vocabulary")) & (F.col("_t_key") == F.col("_e_code")),
                    how="left")
              .join(F.broadcast(shared), (F.col("_t_vocabulary") == F.col("_c_vocabulary"))
                    & (F.col("_t_key") == F.col("_c_code")), how="left"))
    rule = _rule(domain)
    concept = F.coalesce(F.col("_e_concept"), F.col("_c_concept"), rule, F.lit(NO_CONCEPT))
    ref = F.coalesce(F.col("_e_ref"), F.col("_c_ref"),
                     F.when(rule.isNotNull(), F.lit(RULES.get(domain.name))))
    if domain.integer_concept:
        concept = concept.cast("int")
    return joined.select(*base.columns, concept.alias(domain.concept_column), ref.alias(domain.map_column))


def convert_lab_values(df: DataFrame, terminology: Terminology) -> DataFrame:
    """Lab values in their LOINC code's canonical unit, the value as sent kept beside.

    The conversions are computed by the UCUM library for the (code, unit) pairs
    the rows hold (a few dozen; one small Spark job collects them), then joined.
    A numeric value whose unit does not convert (unknown unit, wrong dimension,
    molar mass not declared, code without a canonical unit) keeps its row with
    ``unit_concept_code = '0'`` and a null ``value_as_number``.
    """
    units = terminology.units
    if "value_source_as_number" in df.columns:
        # Silver: the number as sent; a row landed before the concept columns existed has only value_as_number.
        source = F.coalesce(F.col("value_source_as_number"),
                            F.when(F.col("unit_concept_code").isNull(), F.col("value_as_number")))
    else:
        source = F.col("value_as_number")  # validated rows: the number as sent
    base = df.withColumn("_t_source_number", source).drop(*LAB_CONCEPT_COLUMNS)
    pairs = (base.where(F.col("_t_source_number").isNotNull())
             .select("measurement_source_value", "unit_source_value").distinct().collect())
    rows = []
    for code, unit in pairs:
        conversion = units.conversion(code, unit)
        if conversion is not None:
            rows.append((code, unit, conversion.unit, conversion.factor, conversion.offset))
    factors = df.sparkSession.createDataFrame(
        rows, "_u_code string, _u_unit string, _u_canonical string, _u_factor double, _u_offset double")
    joined = base.join(F.broadcast(factors), (F.col("measurement_source_value") == F.col("_u_code"))
                       & (F.col("unit_source_value") == F.col("_u_unit")), how="left")
    number = F.col("_t_source_number")
    converted = F.col("_u_canonical").isNotNull()
    return joined.select(
        *[c for c in base.columns if c != "_t_source_number"],
        F.when(converted, number * F.col("_u_factor") + F.col("_u_offset")).alias("value_as_number"),
        number.alias("value_source_as_number"),
        F.when(number.isNotNull(), F.coalesce(F.col("_u_canonical"), F.lit(NO_CONCEPT))).alias("unit_concept_code"),
        F.when(converted, F.lit(units.map_ref)).alias("measurement_concept_map"),
    )


def with_concepts(df: DataFrame, dataset: str, terminology: Terminology) -> DataFrame:
    """Rows of ``dataset`` with their standard columns derived from their source columns."""
    if dataset == LAB_DATASET:
        return convert_lab_values(df, terminology)
    domain = DOMAIN_OF_DATASET.get(dataset)
    return map_concepts(df, domain, terminology) if domain is not None else df


def concept_columns(dataset: str) -> tuple[str, ...]:
    """The columns :func:`with_concepts` writes for ``dataset``."""
    if dataset == LAB_DATASET:
        return LAB_CONCEPT_COLUMNS
    domain = DOMAIN_OF_DATASET.get(dataset)
    return (domain.concept_column, domain.map_column) if domain else ()


# Researcher-readable comments of the standard columns in silver.
CONCEPT_COMMENTS = {
    "gender_concept_id": "Standard gender (OMOP concept id: 8507 male, 8532 female; 0 = no matching concept).",
    "gender_concept_map": "Concept map (id|version) that gave gender_concept_id; null when none mapped it.",
    "visit_concept_id": "Standard visit type (OMOP concept id: 9201 inpatient, 9202 outpatient, 9203 emergency; "
                        "0 = no matching concept).",
    "visit_concept_map": "Concept map (id|version) that gave visit_concept_id; null when none mapped it.",
    "condition_concept_code": "WHO ICD-10 category (3 characters) of the diagnosis; '0' = no matching concept.",
    "condition_concept_map": "Concept map (id|version) or rule that gave condition_concept_code.",
    "drug_concept_code": "ATC level-5 substance of the drug; '0' = no matching concept.",
    "drug_concept_map": "Concept map (id|version) or rule that gave drug_concept_code.",
    "value_source_as_number": "Numeric result as sent, in unit_source_value.",
    "unit_concept_code": "Canonical UCUM unit of value_as_number for this LOINC code; '0' when the unit sent "
                         "does not convert; null for qualitative results.",
    "measurement_concept_map": "Canonical-unit configuration (units|version) that converted value_as_number.",
}
