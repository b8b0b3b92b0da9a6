"""tools/async_to_sync.py: the sync store modules are generated from their async sources
and current; what the tool does to each async construct (no servers)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parent.parent / "tools"
sys.path.insert(0, str(TOOLS))

import async_to_sync  # noqa: E402


def _sync_of(source: str) -> str:
    return async_to_sync.generate(textwrap.dedent(source), "pkg/_a.py", "pkg/_s.py")


def test_every_generated_sync_module_is_current() -> None:
    stale = async_to_sync.stale()
    assert not stale, "\n".join(
        f"{target} is stale: run `python tools/async_to_sync.py`\n{diff}"
        for target, diff in stale)
    assert async_to_sync.MODULES  # it compared something


def test_no_sync_twin_of_async_code_is_kept_by_hand_unless_listed(tmp_path: Path) -> None:
    assert async_to_sync.hand_kept_twins() == []
    # The scan finds one: a hand-written pair in a package of its own.
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "_io.py").write_text(textwrap.dedent('''\
        class AsyncReader:
            async def read_async(self) -> None: ...


        class Reader:
            def read(self) -> None: ...
        '''))
    assert async_to_sync.hand_kept_twins(tmp_path, "pkg") == [
        "AsyncReader (pkg/_io.py:1) ~ Reader (pkg/_io.py:5)",
        "AsyncReader.read_async (pkg/_io.py:2) ~ Reader.read (pkg/_io.py:6)",
    ]


def test_async_constructs_become_their_sync_counterparts() -> None:
    code = _sync_of('''\
        """Async doc of AsyncPropertyStore."""

        import time

        from psycopg_pool import AsyncConnectionPool

        if True:  # ASYNC
            import asyncio
        else:
            import threading


        class AsyncThing:
            """Uses an ``AsyncConnectionPool``."""

            # SYNC DOCSTRING
            """The blocking thing."""

            async def __aenter__(self, pool: AsyncConnectionPool,
                                 other: int) -> AsyncThing:
                # AsyncThing waits here
                async with pool.connection() as conn:
                    async for row in conn.rows():
                        await asyncio.sleep(0.1)
                return (await self.run(pool)).value

            async def run(self, pool: AsyncConnectionPool) -> AsyncThing:
                if True:  # ASYNC
                    await asyncio.gather(pool.wait_async())
                else:
                    threading.Thread(target=pool.wait).start()
                if True:  # ASYNC
                    await pool.open()
                return self
        ''')
    assert code == textwrap.dedent('''\
        # Generated from pkg/_a.py by tools/async_to_sync.py: do not edit. Change the
        # async source and run `python tools/async_to_sync.py`.
        """Async doc of PropertyStore."""

        import threading
        import time

        from psycopg_pool import ConnectionPool


        class Thing:
            """The blocking thing."""

            def __enter__(self, pool: ConnectionPool,
                          other: int) -> Thing:
                # Thing waits here
                with pool.connection() as conn:
                    for row in conn.rows():
                        time.sleep(0.1)
                return self.run(pool).value

            def run(self, pool: ConnectionPool) -> Thing:
                threading.Thread(target=pool.wait).start()
                return self
        ''')


def test_a_generated_section_follows_its_async_section_in_the_same_module() -> None:
    module = textwrap.dedent('''\
        import time

        # BEGIN ASYNC SOURCE


        async def pause_async(seconds: float) -> None:
            """Pause (asyncio: without blocking the loop)."""
            await asyncio.sleep(seconds)


        # BEGIN GENERATED SYNC
        def stale() -> None: ...
        # END GENERATED SYNC
        ''')
    assert async_to_sync.generate_section(module, "pkg/_m.py") == textwrap.dedent('''\
        import time

        # BEGIN ASYNC SOURCE


        async def pause_async(seconds: float) -> None:
            """Pause (asyncio: without blocking the loop)."""
            await asyncio.sleep(seconds)


        # BEGIN GENERATED SYNC


        def pause(seconds: float) -> None:
            """Pause (asyncio: without blocking the loop)."""
            time.sleep(seconds)


        # END GENERATED SYNC
        ''')


def test_async_names_left_unmapped_stop_the_tool() -> None:
    with pytest.raises(SystemExit, match=r"name asyncio: map it in NAMES or mark it ASYNC"):
        _sync_of('''\
            import asyncio


            async def gather_all(tasks: list[object]) -> None:
                await asyncio.gather(*tasks)
            ''')
