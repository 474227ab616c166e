"""Research access: checked SQL on project extracts and the gateway that serves it."""
