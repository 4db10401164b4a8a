"""Signal injection for the node under test, loaded through PYTHONPATH by its process only.

With ``SAB3R_TEST_SIGINT_AT=node`` the process sends itself SIGINT as the lifecycle node is
being built, with ``activate`` as activation loads the model (with ``import``: see
_InterruptedImport), and waits until rclpy's signal
handler has shut the context down before going on: a signal landing mid-start-up, every time,
whatever the machine's speed (test double). The KeyboardInterrupt Python raises for it is held
back: when it comes in time main() handles it already; the case tested is the one seen, where
the shut-down context makes the next rclpy call fail first (RCLError 'context is invalid').
"""

import os

_AT = os.environ.get('SAB3R_TEST_SIGINT_AT')

if _AT:
    import functools
    import signal
    import time

    def _interrupt_then(fn):
        @functools.wraps(fn)
        def interrupted(*args, **kwargs):
            import rclpy

            deadline = time.monotonic() + 10.0
            interrupted = False
            try:
                os.kill(os.getpid(), signal.SIGINT)  # Python raises it right here, or soon
            except KeyboardInterrupt:
                interrupted = True
            while (rclpy.ok() or not interrupted) and time.monotonic() < deadline:
                try:
                    time.sleep(0.01)
                except KeyboardInterrupt:
                    interrupted = True
            return fn(*args, **kwargs)
        return interrupted

    if _AT == 'node':
        from rclpy.lifecycle import node as _lifecycle

        _lifecycle.LifecycleNodeMixin.__init__ = _interrupt_then(
            _lifecycle.LifecycleNodeMixin.__init__)
    elif _AT == 'activate':
        from ros2_sab3r.inference import factory as _factory

        _factory.load_model = _interrupt_then(_factory.load_model)
    elif _AT == 'import':
        import importlib.abc
        import sys

        class _InterruptedImport(importlib.abc.MetaPathFinder):
            """SIGINT as the node's imports reach scipy.spatial, its KeyboardInterrupt lost
            there, as C code that probes and clears errors lost it (seen)."""

            def find_spec(self, name, path, target=None):
                if name == 'scipy.spatial':
                    sys.meta_path.remove(self)
                    try:
                        os.kill(os.getpid(), signal.SIGINT)
                        time.sleep(0.05)
                    except KeyboardInterrupt:
                        pass
                return None

        sys.meta_path.insert(0, _InterruptedImport())
    else:
        raise ValueError(f'SAB3R_TEST_SIGINT_AT={_AT!r}: expected node, activate or import')
