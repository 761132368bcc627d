"""Experiment (agents-dense-signals-on-loop-cuda-20261126T061917.json): IO_WAIT / ACTIVE
signals applied on the engine loop (between steps) instead of on the client's thread, to test
whether semantic's slower steps come from its parks being issued beside the loop's steps.
python3 signals_on_loop.py [djinn bench agents arguments]."""
import sys
from djinn.engine import engine as E
from djinn.engine.session import Phase
from djinn.bench import agents

def signal_phase(self, session_id, phase, owner=None):
    if phase not in (Phase.IO_WAIT.value, Phase.ACTIVE.value):
        raise E.InvalidRequest(f"unknown phase {phase!r}")
    s = self._session(session_id, owner)
    self.loop.call(self.residency.signal, s, Phase(phase))

E.Engine.signal_phase = signal_phase
sys.exit(agents.main(sys.argv[1:]))
