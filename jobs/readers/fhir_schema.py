"""Explicit Spark schemas of the FHIR R4 elements the reader maps, and nothing more.

Each resource is parsed twice: first its envelope (``resourceType``, ``id``),
then, for the mapped types only, the fields below. Parsing by type keeps one
resource's shape from breaking another's (``name`` is a list of HumanName in
a Patient, a string in an Organization), and unknown elements are ignored.

Conventions:

- Numbers are read as ``StringType``: Spark keeps the JSON token as written
  (``66.89999999999999``, ``1e-3``), and bronze holds text.
- An element declared ``StringType`` but delivered as an object or array is
  kept as its JSON text: presence checks (``valueString``, ``valueRange``) and
  contained resources use that, so a contained resource of any shape never
  makes its container unreadable.
- Every schema ends with :data:`CORRUPT_FIELD`: ``from_json`` fills it when the
  text is not JSON or an element does not have the declared FHIR type.
"""

from __future__ import annotations

from pyspark.sql.types import ArrayType, StringType, StructField, StructType

CORRUPT_FIELD = "_corrupt_record"
JSON_OPTIONS = {"mode": "PERMISSIVE", "columnNameOfCorruptRecord": CORRUPT_FIELD}


def _s(name: str) -> StructField:
    return StructField(name, StringType(), True)


def _f(name: str, data_type) -> StructField:
    return StructField(name, data_type, True)


def _with_corrupt(fields: list[StructField]) -> StructType:
    return StructType(fields + [_s(CORRUPT_FIELD)])


# ------------------------------------------------------------ data types ----

CODING = StructType([_s("system"), _s("code")])
CODEABLE_CONCEPT = StructType([_f("coding", ArrayType(CODING))])
REFERENCE = StructType([_s("reference"), _s("display")])
PERIOD = StructType([_s("start"), _s("end")])
QUANTITY = StructType([_s("value"), _s("unit"), _s("system"), _s("code")])
IDENTIFIER = StructType([_s("use"), _f("type", CODEABLE_CONCEPT), _s("system"), _s("value")])
HUMAN_NAME = StructType([_s("use"), _s("family"), _f("given", ArrayType(StringType()))])
ADDRESS = StructType([_s("use"), _f("line", ArrayType(StringType())), _s("city"), _s("postalCode")])
CONTACT_POINT = StructType([_s("system"), _s("value"), _s("use")])
# A contained resource: only what a ``#id`` reference needs; ``code`` stays JSON
# text because its type differs between resource types.
CONTAINED = StructType([_s("resourceType"), _s("id"), _s("code")])

# ------------------------------------------------------------- envelopes ----

RESOURCE_ENVELOPE = _with_corrupt([_s("resourceType"), _s("id")])

BUNDLE_ENTRY = StructType([
    _s("fullUrl"),
    _s("resource"),  # JSON text of the entry's resource, parsed like an NDJSON line
    _f("request", StructType([_s("method"), _s("url")])),
])
BUNDLE = _with_corrupt([_s("resourceType"), _s("type"), _f("entry", ArrayType(BUNDLE_ENTRY))])

# ------------------------------------------------------------- resources ----

PATIENT = _with_corrupt([
    _f("identifier", ArrayType(IDENTIFIER)),
    _f("name", ArrayType(HUMAN_NAME)),
    _f("telecom", ArrayType(CONTACT_POINT)),
    _s("gender"),
    _s("birthDate"),
    _s("deceasedDateTime"),
    _s("deceasedBoolean"),
    _f("address", ArrayType(ADDRESS)),
])

ENCOUNTER = _with_corrupt([
    _s("status"),
    _f("class", CODING),
    _f("subject", REFERENCE),
    _f("period", PERIOD),
    _f("reasonCode", ArrayType(StructType([_f("coding", ArrayType(CODING)), _s("text")]))),
    _f("location", ArrayType(StructType([_f("location", REFERENCE)]))),
    _f("serviceProvider", REFERENCE),
])

CONDITION = _with_corrupt([
    _f("verificationStatus", CODEABLE_CONCEPT),
    _f("category", ArrayType(CODEABLE_CONCEPT)),
    _f("code", CODEABLE_CONCEPT),
    _f("subject", REFERENCE),
    _f("encounter", REFERENCE),
    _s("onsetDateTime"),
    _f("onsetPeriod", PERIOD),
    _s("abatementDateTime"),
    _f("abatementPeriod", PERIOD),
    _s("recordedDate"),
])

# value[x]: the mapped choices are typed; the others are only detected.
OBSERVATION_VALUE_TEXT = ("valueBoolean", "valueInteger", "valueDateTime", "valueTime")
OBSERVATION_VALUE_UNMAPPED = ("valueString", "valueRange", "valueRatio", "valueSampledData", "valuePeriod")
_OBSERVATION_VALUE = [
    _f("valueQuantity", QUANTITY),
    _f("valueCodeableConcept", CODEABLE_CONCEPT),
    *[_s(name) for name in OBSERVATION_VALUE_TEXT],
    *[_s(name) for name in OBSERVATION_VALUE_UNMAPPED],
]
# Observation.component: a code and a value[x] each, read with the same fields as the
# Observation's own value so that both map alike.
OBSERVATION_COMPONENT = StructType([_f("code", CODEABLE_CONCEPT), *_OBSERVATION_VALUE])
OBSERVATION = _with_corrupt([
    _s("status"),
    # Routes the Observation (social-history, survey → observation) and lands as ``category``.
    _f("category", ArrayType(CODEABLE_CONCEPT)),
    _f("code", CODEABLE_CONCEPT),
    _f("subject", REFERENCE),
    _f("encounter", REFERENCE),
    _s("effectiveDateTime"),
    _f("effectivePeriod", PERIOD),
    _s("effectiveInstant"),
    _s("issued"),
    *_OBSERVATION_VALUE,
    _f("component", ArrayType(OBSERVATION_COMPONENT)),
])

DOSAGE = StructType([
    _f("timing", StructType([_f("repeat", StructType([_f("boundsPeriod", PERIOD)]))])),
    _f("route", CODEABLE_CONCEPT),
    _f("doseAndRate", ArrayType(StructType([_f("doseQuantity", QUANTITY)]))),
])
MEDICATION_REQUEST = _with_corrupt([
    _s("status"),
    _f("contained", ArrayType(CONTAINED)),
    _f("medicationCodeableConcept", CODEABLE_CONCEPT),
    _f("medicationReference", REFERENCE),
    _f("subject", REFERENCE),
    _f("encounter", REFERENCE),
    _s("authoredOn"),
    _f("dosageInstruction", ArrayType(DOSAGE)),
    _f("dispenseRequest", StructType([_f("validityPeriod", PERIOD)])),
])

CONSENT = _with_corrupt([
    _s("status"),
    _f("patient", REFERENCE),
    _s("dateTime"),
    _f("policy", ArrayType(StructType([_s("uri")]))),
    _f("provision", StructType([
        _s("type"),
        _f("period", PERIOD),
        _f("purpose", ArrayType(CODING)),
    ])),
])

# Resource type -> the schema its fields are read with.
RESOURCE_SCHEMAS: dict[str, StructType] = {
    "Patient": PATIENT,
    "Encounter": ENCOUNTER,
    "Condition": CONDITION,
    "Observation": OBSERVATION,
    "MedicationRequest": MEDICATION_REQUEST,
    "Consent": CONSENT,
}

# Element names of the mapped types (R4). A quarantined row lists which of these
# a resource carried: its structure, never a value. Any other key is only counted,
# since a malformed resource could use a value (a name) as a key.
_COMMON_ELEMENTS = ("resourceType", "id", "meta", "implicitRules", "language", "text", "contained",
                    "extension", "modifierExtension", "identifier", "status", "subject", "encounter",
                    "category", "code", "note", "basedOn", "partOf")
R4_ELEMENTS: dict[str, tuple[str, ...]] = {
    "Patient": ("active", "name", "telecom", "gender", "birthDate", "deceasedBoolean", "deceasedDateTime",
                "address", "maritalStatus", "multipleBirthBoolean", "multipleBirthInteger", "photo",
                "contact", "communication", "generalPractitioner", "managingOrganization", "link"),
    "Encounter": ("statusHistory", "class", "classHistory", "type", "serviceType", "priority",
                  "episodeOfCare", "participant", "appointment", "period", "length", "reasonCode",
                  "reasonReference", "diagnosis", "account", "hospitalization", "location",
                  "serviceProvider"),
    "Condition": ("clinicalStatus", "verificationStatus", "severity", "bodySite", "onsetDateTime", "onsetAge",
                  "onsetPeriod", "onsetRange", "onsetString", "abatementDateTime", "abatementAge",
                  "abatementPeriod", "abatementRange", "abatementString", "recordedDate", "recorder",
                  "asserter", "stage", "evidence"),
    "Observation": ("focus", "effectiveDateTime", "effectivePeriod", "effectiveTiming", "effectiveInstant",
                    "issued", "performer", "valueQuantity", "valueCodeableConcept", "valueString",
                    "valueBoolean", "valueInteger", "valueRange", "valueRatio", "valueSampledData",
                    "valueTime", "valueDateTime", "valuePeriod", "dataAbsentReason", "interpretation",
                    "bodySite", "method", "specimen", "device", "referenceRange", "hasMember", "derivedFrom",
                    "component"),
    "MedicationRequest": ("statusReason", "intent", "priority", "doNotPerform", "reportedBoolean",
                          "reportedReference", "medicationCodeableConcept", "medicationReference",
                          "supportingInformation", "authoredOn", "requester", "performer", "performerType",
                          "recorder", "reasonCode", "reasonReference", "instantiatesCanonical",
                          "instantiatesUri", "groupIdentifier", "courseOfTherapyType", "insurance",
                          "dosageInstruction", "dispenseRequest", "substitution", "priorPrescription",
                          "detectedIssue", "eventHistory"),
    "Consent": ("scope", "patient", "dateTime", "performer", "organization", "sourceAttachment",
                "sourceReference", "policy", "policyRule", "verification", "provision"),
}
KNOWN_ELEMENTS = tuple(sorted({*_COMMON_ELEMENTS, *(e for names in R4_ELEMENTS.values() for e in names)}))


# Every resource type of FHIR R4 (4.0.1). A well-formed resource of one of these types
# that maps to no dataset is not collected (counted, not read); any other
# ``resourceType`` is not FHIR R4 and is quarantined.
R4_RESOURCE_TYPES = frozenset({
    "Account", "ActivityDefinition", "AdverseEvent", "AllergyIntolerance", "Appointment", "AppointmentResponse",
    "AuditEvent", "Basic", "Binary", "BiologicallyDerivedProduct", "BodyStructure", "Bundle",
    "CapabilityStatement", "CarePlan", "CareTeam", "CatalogEntry", "ChargeItem", "ChargeItemDefinition", "Claim",
    "ClaimResponse", "ClinicalImpression", "CodeSystem", "Communication", "CommunicationRequest",
    "CompartmentDefinition", "Composition", "ConceptMap", "Condition", "Consent", "Contract", "Coverage",
    "CoverageEligibilityRequest", "CoverageEligibilityResponse", "DetectedIssue", "Device", "DeviceDefinition",
    "DeviceMetric", "DeviceRequest", "DeviceUseStatement", "DiagnosticReport", "DocumentManifest",
    "DocumentReference", "EffectEvidenceSynthesis", "Encounter", "Endpoint", "EnrollmentRequest",
    "EnrollmentResponse", "EpisodeOfCare", "EventDefinition", "Evidence", "EvidenceVariable", "ExampleScenario",
    "ExplanationOfBenefit", "FamilyMemberHistory", "Flag", "Goal", "GraphDefinition", "Group", "GuidanceResponse",
    "HealthcareService", "ImagingStudy", "Immunization", "ImmunizationEvaluation", "ImmunizationRecommendation",
    "ImplementationGuide", "InsurancePlan", "Invoice", "Library", "Linkage", "List", "Location", "Measure",
    "MeasureReport", "Media", "Medication", "MedicationAdministration", "MedicationDispense",
    "MedicationKnowledge", "MedicationRequest", "MedicationStatement", "MedicinalProduct",
    "MedicinalProductAuthorization", "MedicinalProductContraindication", "MedicinalProductIndication",
    "MedicinalProductIngredient", "MedicinalProductInteraction", "MedicinalProductManufactured",
    "MedicinalProductPackaged", "MedicinalProductPharmaceutical", "MedicinalProductUndesirableEffect",
    "MessageDefinition", "MessageHeader", "MolecularSequence", "NamingSystem", "NutritionOrder", "Observation",
    "ObservationDefinition", "OperationDefinition", "OperationOutcome", "Organization",
    "OrganizationAffiliation", "Parameters", "Patient", "PaymentNotice", "PaymentReconciliation", "Person",
    "PlanDefinition", "Practitioner", "PractitionerRole", "Procedure", "Provenance", "Questionnaire",
    "QuestionnaireResponse", "RelatedPerson", "RequestGroup", "ResearchDefinition", "ResearchElementDefinition",
    "ResearchStudy", "ResearchSubject", "RiskAssessment", "RiskEvidenceSynthesis", "Schedule", "SearchParameter",
    "ServiceRequest", "Slot", "Specimen", "SpecimenDefinition", "StructureDefinition", "StructureMap",
    "Subscription", "Substance", "SubstanceNucleicAcid", "SubstancePolymer", "SubstanceProtein",
    "SubstanceReferenceInformation", "SubstanceSourceMaterial", "SubstanceSpecification", "SupplyDelivery",
    "SupplyRequest", "Task", "TerminologyCapabilities", "TestReport", "TestScript", "ValueSet",
    "VerificationResult", "VisionPrescription",
})
