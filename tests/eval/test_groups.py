import pytest

from fedlt.data.longtail import longtail_counts
from fedlt.eval.groups import SHOT_RULES, shot_groups

# fedloge-protocol.md §5.5 group sizes
@pytest.mark.parametrize("k,n_max,IF,rule,sizes", [
    (10, 5000, 100, "cumulative_75_95", (3, 3, 4)),
    (10, 5000, 50, "cumulative_75_95", (4, 3, 3)),
    (100, 500, 100, "cumulative_75_95", (30, 31, 39)),
    (100, 500, 50, "cumulative_75_95", (34, 34, 32)),
    (100, 500, 100, "count_100_20", (35, 35, 30)),
    (100, 500, 50, "count_100_20", (41, 41, 18)),
    (100, 500, 100, "fraction_50_30_20", (50, 30, 20)),
])
def test_group_sizes_match_the_protocol(k, n_max, IF, rule, sizes):
    g = shot_groups(longtail_counts(k, n_max, IF), rule)
    assert tuple(len(g[x]) for x in ("head", "mid", "tail")) == sizes


@pytest.mark.parametrize("rule", SHOT_RULES)
def test_groups_partition_the_classes(rule):
    g = shot_groups(longtail_counts(20, 1000, 100), rule)
    assert sorted(g["head"] + g["mid"] + g["tail"]) == list(range(20))


def test_empty_group_allowed():
    assert shot_groups([500, 400, 300], "count_100_20")["tail"] == []
