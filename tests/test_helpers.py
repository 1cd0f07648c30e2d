"""The shared closeness assertion fails where it should: a difference beyond the tolerance, a NaN
where a number is wanted, a wrong shape or dtype."""

import numpy
import pytest
from helpers import assert_close


def test_assert_close_passes_within_the_tolerance_and_fails_outside_it():
    want = numpy.array([1.0, 2.0, numpy.nan])
    assert_close(want + 1e-9, want, 1e-6, 0.0, "within")
    with pytest.raises(AssertionError, match=r"1 of 3 entries differ"):
        assert_close(want + [0.0, 1e-3, 0.0], want, 1e-6, 0.0, "outside")
    with pytest.raises(AssertionError, match="NaN|differ"):
        assert_close([1.0, numpy.nan, numpy.nan], want, 1e-6, 0.0, "a NaN where 2.0 is wanted")
    with pytest.raises(AssertionError, match="shape"):
        assert_close(want[:2], want, 1e-6, 0.0, "shape")
    with pytest.raises(AssertionError, match="float32"):
        assert_close(want, want, 1e-6, 0.0, "dtype", dtype=numpy.float32)
