"""The one switch between real NKI and the simulator.

Every kernel module imports ``nki``, ``nl`` (``nki.language``) and ``nisa`` (``nki.isa``) from
here. On a Neuron machine, where ``import nki`` works, they are the real packages and the
kernels compile with ``nki.jit`` for the NeuronCore; anywhere else (the ``nki`` name on PyPI is
a placeholder that raises ImportError) they are ember's NumPy simulator (``simulator.py``).
``SIMULATED`` says which one is in use.
"""

try:
    import nki
    import nki.isa as nisa
    import nki.language as nl

    SIMULATED = False
except ImportError:
    from ember.neuron_kernels import simulator as nki
    from ember.neuron_kernels.simulator import isa as nisa
    from ember.neuron_kernels.simulator import language as nl

    SIMULATED = True

__all__ = ["SIMULATED", "nisa", "nki", "nl"]
