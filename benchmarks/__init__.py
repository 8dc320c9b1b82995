"""fluxrun benchmarks: ``python -m benchmarks`` (``--help`` for the options).

Every figure is printed beside a floor measured in the same run on the same machine: a bare
asyncio loop for the engine's in-memory overhead, raw ``sqlite3`` commits for the SQLite
store, raw psycopg inserts for the PostgreSQL store. Figures are the best of several timed
batches after a warm-up, so a busy machine shows up as noise in both columns at once rather
than as a slow engine.
"""

from __future__ import annotations
