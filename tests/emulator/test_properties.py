"""Property tests: random guest code under random intercept sets, in every mode, ends in a
documented stop reason; the decoder never raises."""
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ringminus import Machine, StopReason
from ringminus.decode.decoder import decode
from ringminus.intercepts import InterceptControls
from ringminus.intercepts.controls import LAST_INTERCEPT_BIT
from ringminus.intercepts.profiles import PROFILES

MODES = [("real", 0x7C00, 0), ("protected", 0x100000, 0), ("protected", 0x100000, 3),
         ("long", 0x100000, 0), ("long", 0x100000, 3)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(code=st.binary(min_size=1, max_size=64), mode=st.sampled_from(MODES),
       intercepts=st.sets(st.integers(0, LAST_INTERCEPT_BIT), max_size=40),
       ports=st.sets(st.integers(0, 0xFFFF), max_size=4), profile=st.sampled_from(sorted(PROFILES)),
       on_exit=st.sampled_from(["stop", "skip"]))
def test_random_guest_code_ends_in_a_documented_stop(code, mode, intercepts, ports, profile, on_exit):
    boot, address, cpl = mode
    machine = Machine(memory_size=4 << 20)
    machine.write_memory(address, code)
    machine.boot(boot, address, cpl)
    controls = InterceptControls()
    controls.set(*intercepts)
    for port in ports:
        controls.set_ports(port)
    machine.enter_guest(controls, profile, on_exit)
    result = machine.run(max_instructions=2000, timeout=5)
    assert result.stop.reason in set(StopReason)
    assert isinstance(result.regs["rip"], int)
    if result.stop.reason is StopReason.VMEXIT:
        assert result.vmexit["code"] in range(-1, 0x404)


@settings(max_examples=3000, deadline=None)
@given(code=st.binary(max_size=16), bits=st.sampled_from([16, 32, 64]))
def test_decode_never_raises(code, bits):
    decode(code, bits)
