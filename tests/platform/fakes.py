"""Stand-ins for the machine's clock and event methods, for driving the interrupt controllers
and timers (lapic.py, ioapic.py, hpet.py) register by register and nanosecond by nanosecond."""
from __future__ import annotations


class FakeTimer:
    def __init__(self, due: int, callback):
        self.due, self.callback = due, callback
        self.cancelled = self.fired = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """``now_ns``/``add_timer`` as VirtualClock offers them; time moves only by ``advance``."""

    def __init__(self, now: int = 0):
        self.now = now
        self.timers: list[FakeTimer] = []

    def now_ns(self) -> int:
        return self.now

    def add_timer(self, after_ns: int, callback) -> FakeTimer:
        assert after_ns >= 0
        timer = FakeTimer(self.now + after_ns, callback)
        self.timers.append(timer)
        return timer

    def armed(self) -> list[int]:
        """The due times of the timers still to fire, in order."""
        return sorted(t.due for t in self.timers if not (t.cancelled or t.fired))

    def _next(self) -> FakeTimer | None:
        self.timers = [t for t in self.timers if not (t.cancelled or t.fired)]
        return min(self.timers, key=lambda t: t.due, default=None)

    def advance(self, ns: int) -> None:
        """Move time on by ``ns``, firing each timer due by then at its own time."""
        target = self.now + ns
        while (timer := self._next()) is not None and timer.due <= target:
            self.now = max(self.now, timer.due)
            timer.fired = True
            timer.callback()
        self.now = target

    def advance_to(self, when: int) -> None:
        self.advance(when - self.now)

    def fire_next_halted(self) -> None:
        """The next timer fires before the clock shows its due time (a host-time clock, or a
        core that fast-forwards a halt without moving the clock): the clock stays."""
        timer = self._next()
        timer.fired = True
        timer.callback()


class FakeMachine:
    """The services a platform device uses (Core's): a clock, the controller and reset-hook
    registries, add_mmio, and the CPU's event inputs, counted."""

    def __init__(self, now: int = 0):
        self.clock = FakeClock(now)
        self.interrupt_controllers: list = []
        self.reset_hooks: list = []
        self.mmio: list = []
        self.raised = self.nmis = self.smis = self.inits = 0

    def add_interrupt_controller(self, controller) -> None:
        self.interrupt_controllers.append(controller)

    def add_reset_hook(self, hook) -> None:
        self.reset_hooks.append(hook)

    def add_mmio(self, base: int, size: int, device, name: str = ""):
        self.mmio.append((base, size, device, name))
        return (base, size)

    def interrupt_raised(self) -> None:
        self.raised += 1

    def raise_nmi(self) -> None:
        self.nmis += 1

    def raise_smi(self) -> None:
        self.smis += 1

    def raise_init(self) -> None:
        """As the core's: the reset hooks run (the CPU resets)."""
        self.inits += 1
        for hook in self.reset_hooks:
            hook()
