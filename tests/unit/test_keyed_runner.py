"""KeyedRunner: bursts of requests fold into one run per key; failures are retried; runs never overlap."""

from __future__ import annotations

import asyncio

import pytest
from edgeloop.handlers import KeyedRunner


def test_a_burst_of_requests_is_one_run_per_key():
    runs = []

    async def work(key):
        runs.append(key)

    async def scenario():
        runner = KeyedRunner(work, delay=0.01)
        for _ in range(100):
            runner.request("a")
            runner.request("b")
        await asyncio.sleep(0.05)

    asyncio.run(scenario())
    assert sorted(runs) == ["a", "b"]


def test_a_sooner_request_moves_a_later_scheduled_run_forward():
    runs = []

    async def work(key):
        runs.append(key)

    async def scenario():
        runner = KeyedRunner(work, delay=0.01)
        runner.request("a", delay=30)  # a wake-up far ahead
        runner.request("a")  # a watch event: its run must not wait for the wake-up
        runner.request("a", delay=20)
        await asyncio.sleep(0.05)
        await runner.close()

    asyncio.run(scenario())
    assert runs == ["a"]


def test_a_request_during_a_run_gets_a_run_of_its_own_after_it():
    runs, active = [], []

    async def work(key):
        assert not active, "runs for one key never overlap"
        active.append(key)
        await asyncio.sleep(0.02)
        runs.append(key)
        active.pop()

    async def scenario():
        runner = KeyedRunner(work, delay=0)
        runner.request("a")
        await asyncio.sleep(0.01)  # the first run is under way
        runner.request("a")
        await runner.run("a")  # a direct run waits its turn too
        await asyncio.sleep(0.05)

    asyncio.run(scenario())
    assert runs == ["a", "a", "a"]


def test_a_failed_requested_run_is_retried_and_a_direct_run_raises():
    attempts = []

    async def flaky(key):
        attempts.append(key)
        if len(attempts) < 3:
            raise RuntimeError("API server unavailable")

    async def scenario():
        runner = KeyedRunner(flaky, delay=0, retry_delays=(0.01,))
        with pytest.raises(RuntimeError):
            await runner.run("a")
        runner.request("a")
        await asyncio.sleep(0.1)
        await runner.close()

    asyncio.run(scenario())
    assert attempts == ["a", "a", "a"]
