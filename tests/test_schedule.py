import pytest

from proxyattention.schedule import (
    ScheduleError,
    parse_schedule,
    quote_schedule_overrides,
)


@pytest.mark.parametrize("text,segments,epochs,after", [
    ("5,p,9,p,9,p,9,p,4", (5, 9, 9, 9, 4), 36, (5, 14, 23, 32)),
    ("20,p,19", (20, 19), 39, (20,)),
    ("7", (7,), 7, ()),
    (" 2 , P , 3 ", (2, 3), 5, (2,)),
    ("2,3,p,1", (5, 1), 6, (5,)),
])
def test_parse(text, segments, epochs, after):
    s = parse_schedule(text)
    assert s.segments == segments
    assert s.epochs == epochs
    assert s.proxy_after == after
    assert s.has_proxy == bool(after)


def test_baseline_has_same_epochs_without_steps():
    s = parse_schedule("5,p,9,p,9,p,9,p,4")
    assert s.baseline.epochs == 36
    assert s.baseline.text == "36"
    assert not s.baseline.has_proxy


@pytest.mark.parametrize("bad,fragment", [
    ("5,q,3", "'q'"), ("p,p", "starts with 'p'"), ("", "empty"), ("3,-1", "must be > 0"),
    ("3,p,p,2", "two 'p' in a row"), ("3,p", "ends with 'p'"), ("0", "must be > 0"),
])
def test_rejects_malformed(bad, fragment):
    with pytest.raises(ScheduleError) as e:
        parse_schedule(bad)
    assert "proxy.schedule" in str(e.value)
    assert fragment in str(e.value)


def test_schedule_overrides_need_no_quotes():
    assert quote_schedule_overrides(["proxy.schedule=20,p,19", "a=1,2", "proxy.schedule='3,p,4'",
                                     "+proxy.schedule=1,p,1"]) == [
        "proxy.schedule='20,p,19'", "a=1,2", "proxy.schedule='3,p,4'", "+proxy.schedule='1,p,1'"]
    # A bad token makes it one (bad) schedule, named whole; plain epoch counts stay a sweep.
    assert quote_schedule_overrides(["proxy.schedule=5,q,3", "proxy.schedule=2,4"]) == [
        "proxy.schedule='5,q,3'", "proxy.schedule=2,4"]


def test_p_trains_gives_the_thesis_epoch_budget():
    thesis = parse_schedule("5,p,9,p,9,p,9,p,4", p_trains=True)
    assert thesis.epochs == 40 and thesis.proxy_after == (6, 16, 26, 36) and thesis.text == "5,p,9,p,9,p,9,p,4"
    long = parse_schedule("20,p,19", p_trains=True)
    assert long.epochs == 40 and long.proxy_after == (21,) and long.baseline.text == "40"
    assert parse_schedule("20,p,19").epochs == 39  # a p between epochs trains nothing
