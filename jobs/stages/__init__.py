"""Stages of the flow: landing → bronze → staged → validated → silver → extracts and gold."""
