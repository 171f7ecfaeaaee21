"""FastAPI app that serves exported recdistill artifacts."""
