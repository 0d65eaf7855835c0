"""unionrun: a small container launcher over the union of image layers."""
