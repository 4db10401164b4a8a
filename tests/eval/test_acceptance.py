"""The acceptance table's closest calls, parsed from the reasons Locate writes."""

from __future__ import annotations

import math

import pytest

from ros2_sab3r.eval.acceptance import margins

pytestmark = pytest.mark.unit


def _q(present: bool, status: str, reason: str) -> dict:
    return {'present': present, 'status': status, 'reason': reason}


def test_margins_take_the_weakest_found_and_the_strongest_absent_candidate():
    bags = [{'queries': [
        _q(True, 'FOUND', "cosine 0.350 beats 'object' (0.230) by 4.6 std; 6.1 std above the "
                          'vocabulary'),
        _q(True, 'FOUND', "cosine 0.248 beats 'object' (0.231) by 0.7 std; 2.3 std above the "
                          'vocabulary'),
        _q(False, 'NOT_FOUND', "no group of query.min_instance_voxels=10 voxels where 'door' "
                               'beats the vocabulary'),
        _q(False, 'NOT_FOUND', 'best candidate (10 voxels) is only 1.8 std above the vocabulary '
                               '(query.vocabulary_min_z=2)'),
    ]}, {'queries': [
        _q(True, 'FOUND', "cosine 0.300 beats 'desk' (0.260) by 0.9 std; 2.1 std above the "
                          'vocabulary'),
        _q(False, 'NOT_FOUND', "best candidate (12 voxels) is more like 'lamp' (0.283) than "
                               "'picture' (0.281)"),
        _q(False, 'FOUND', "cosine 0.300 beats 'desk' (0.260) by 0.6 std; 2.4 std above the "
                           'vocabulary'),
    ]}]
    m = margins(bags)
    assert m['present_min_lead'] == 0.7 and m['present_min_z'] == 2.1
    assert m['absent_max_z'] == 2.4  # a wrongly FOUND absent class counts with its z
    assert m['absent_with_candidate'] == '3/4'
    empty = margins([{'queries': [_q(False, 'NOT_FOUND', 'no group of ...')]}])
    assert math.isnan(empty['absent_max_z']) and empty['absent_with_candidate'] == '0/1'
