"""Core: settings, the Spark session, the configuration, schemas, zones and the ops tables."""
