"""Helpers (no tests) for the reliability tests: a method and a benchmark that fail on demand.

They live in a module of their own so that spawned worker processes can import them through a
spec's ``[benchmark].imports`` (``test_reliability_fake``). Failures are switched on by environment
variables, which worker processes inherit.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal

import sweep_fake  # noqa: F401  (registers the fake benchmark)
from sweep_fake import FakeBenchmark

from overunlearn.benchmarks import register_benchmark
from overunlearn.methods import Method, register_method
from overunlearn.methods.registry import _REGISTRY

#: set to "1": rel_flaky raises a RuntimeError; rel_killer kills its worker process (never the main process)
FLAKY = "OVERUNLEARN_TEST_FLAKY"
KILL = "OVERUNLEARN_TEST_KILL"
#: set to "1": the rel_flaky_ref benchmark's reference measurement raises
REF_FAILS = "OVERUNLEARN_TEST_REF_FAILS"

if "rel_flaky" not in _REGISTRY:

    @register_method("rel_flaky")
    class Flaky(Method):
        """Descent that raises an ordinary RuntimeError while ``$OVERUNLEARN_TEST_FLAKY`` is ``1``."""

        def loss(self, ctx, info, retain, forget):  # type: ignore[override]
            if os.environ.get(FLAKY) == "1":
                raise RuntimeError("flaky: a transient failure")
            return ctx.batch_loss(retain)

    @register_method("rel_killer")
    class Killer(Method):
        """Descent that SIGKILLs its own worker process while ``$OVERUNLEARN_TEST_KILL`` is ``1``."""

        def loss(self, ctx, info, retain, forget):  # type: ignore[override]
            if os.environ.get(KILL) == "1" and mp.current_process().name != "MainProcess":
                os.kill(os.getpid(), signal.SIGKILL)
            return ctx.batch_loss(retain)


class FlakyReference(FakeBenchmark):
    """The fake benchmark, whose reference measurement fails while ``$OVERUNLEARN_TEST_REF_FAILS`` is ``1``."""

    name = "rel_flaky_ref"

    def reference(self, seed: int) -> dict[str, dict[str, float]]:
        if os.environ.get(REF_FAILS) == "1":
            raise RuntimeError("reference: a transient failure")
        return super().reference(seed)


register_benchmark("rel_flaky_ref")(FlakyReference)
