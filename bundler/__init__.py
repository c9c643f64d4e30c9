"""llamabox's build tool: turns a GGUF model and a runtime stub into one executable."""
