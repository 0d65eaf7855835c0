"""The union filesystem (unionmount): layers, lookup, copy-up, the request handlers, the sessions that
serve them, and their Cython twins (``_fast_c``, ``_session_c``)."""
