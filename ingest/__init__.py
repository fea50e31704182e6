"""The ingest service: MQTT intake, codecs, the batch pipeline, metrics and the CLI."""
