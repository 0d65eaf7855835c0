"""The step cache: a step's key, computed before it runs, from its parent's key, the instruction,
the ARG and ENV values it sees and, for COPY and ADD, the digest of what it copies (context.digest);
the layer a key made is kept in the store (Store.cache_layer / cached_layer).
"""

from __future__ import annotations

import hashlib
import json


def base_key(what):
    """The key a stage starts from: its base image's ID (config digest), a stage's key, or scratch."""
    return hashlib.sha256(json.dumps(["FROM", what]).encode()).hexdigest()


def step_key(parent, instruction, args, env, content=None):
    """The key of one step: everything that can change what it makes, never times."""
    return hashlib.sha256(json.dumps(
        [parent, instruction, sorted(args.items()), list(env), content]).encode()).hexdigest()


class Cache:
    """Lookups (unless --no-cache) and records of step layers in the store."""

    def __init__(self, store, use=True):
        self.store, self.use = store, use

    def get(self, key):
        return self.store.cached_layer(key) if self.use else None

    def put(self, key, upper):
        return self.store.cache_layer(key, upper)
