"""`unionrun build`: images from a Containerfile (parser, context, step cache, executor)."""
