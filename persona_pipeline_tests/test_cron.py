"""Cron expressions (domain/cron.py): parsing, every error, Vixie day matching, macros, and fire
times across DST changes, checked against a minute-by-minute reference."""

import random
import time
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from persona_pipeline.domain.cron import CronError, CronSpec, fire_times, next_fire_times, parse_cron

UTC = timezone.utc
NEW_YORK = ZoneInfo("America/New_York")
BERLIN = ZoneInfo("Europe/Berlin")


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=UTC)


def local_day(tz: ZoneInfo, year: int, month: int, day: int) -> tuple[datetime, datetime]:
    """(start, end] in UTC covering the local calendar day (start = the instant before local midnight)."""
    start = datetime(year, month, day, tzinfo=tz).astimezone(UTC)
    end = (datetime(year, month, day, tzinfo=tz) + timedelta(days=1)).astimezone(UTC)
    return start - timedelta(minutes=1), end - timedelta(minutes=1)


# ---- parsing ------------------------------------------------------------------------------------

def test_fields_ranges_steps_lists_and_names():
    spec = parse_cron("  */15   1-3,22  1,15-17  jan-Mar,DEC  mon-FRI ")
    assert spec.expression == "*/15 1-3,22 1,15-17 jan-Mar,DEC mon-FRI"
    assert spec.minutes == {0, 15, 30, 45}
    assert spec.hours == {1, 2, 3, 22}
    assert spec.days_of_month == {1, 15, 16, 17}
    assert spec.months == {1, 2, 3, 12}
    assert spec.days_of_week == {1, 2, 3, 4, 5}
    assert spec.day_or  # both day fields restricted

    assert parse_cron("10/20 * * * *").minutes == {10, 30, 50}  # a/s runs to the field's end
    assert parse_cron("1-10/3 * * * *").minutes == {1, 4, 7, 10}
    assert parse_cron("* * * * 7").days_of_week == {0}  # 7 is Sunday
    assert parse_cron("* * * * 5-7").days_of_week == {5, 6, 0}
    assert parse_cron("* * * * 0-7").days_of_week == set(range(7))
    assert parse_cron("* * * * sun,SAT").days_of_week == {0, 6}
    assert parse_cron("0 0 * * *").day_or is False


@pytest.mark.parametrize("macro, expansion", [
    ("@yearly", "0 0 1 1 *"), ("@annually", "0 0 1 1 *"), ("@monthly", "0 0 1 * *"), ("@weekly", "0 0 * * 0"),
    ("@daily", "0 0 * * *"), ("@midnight", "0 0 * * *"), ("@hourly", "0 * * * *"),
])
def test_macros_mean_their_expansion_and_keep_their_name(macro, expansion):
    spec, expanded = parse_cron(macro.upper()), parse_cron(expansion)
    assert spec.expression == macro
    assert (spec.minutes, spec.hours, spec.days_of_month, spec.months, spec.days_of_week, spec.day_or) == \
        (expanded.minutes, expanded.hours, expanded.days_of_month, expanded.months, expanded.days_of_week, expanded.day_or)


@pytest.mark.parametrize("expression, message", [
    ("61 * * * *", "invalid cron '61 * * * *': minute '61' is out of range 0-59"),
    ("* * *", "invalid cron '* * *': expected 5 fields (minute hour day-of-month month day-of-week), got 3"),
    ("* * * * * *", "invalid cron '* * * * * *': expected 5 fields (minute hour day-of-month month day-of-week), got 6"),
    ("", "invalid cron '': the expression is empty; expected 5 fields"),
    ("   ", "invalid cron '   ': the expression is empty"),
    ("0 24 * * *", "invalid cron '0 24 * * *': hour '24' is out of range 0-23"),
    ("0 0 0 * *", "invalid cron '0 0 0 * *': day-of-month '0' is out of range 1-31"),
    ("0 0 1 13 *", "invalid cron '0 0 1 13 *': month '13' is out of range 1-12"),
    ("0 0 * * 8", "invalid cron '0 0 * * 8': day-of-week '8' is out of range 0-7"),
    ("1,70 * * * *", "invalid cron '1,70 * * * *': minute '70' is out of range 0-59"),
    ("0 1-30 * * *", "invalid cron '0 1-30 * * *': hour '30' is out of range 0-23"),
    ("*/0 * * * *", "invalid cron '*/0 * * * *': minute '*/0' has step 0; a step must be 1 or more"),
    ("0 0 * * 1-5/0", "invalid cron '0 0 * * 1-5/0': day-of-week '1-5/0' has step 0"),
    ("30-10 * * * *", "invalid cron '30-10 * * * *': minute '30-10' is a reversed range (30 > 10)"),
    ("0 0 * * FRI-MON", "invalid cron '0 0 * * FRI-MON': day-of-week 'FRI-MON' is a reversed range (5 > 1)"),
    ("x * * * *", "invalid cron 'x * * * *': minute 'x' is not a number"),
    ("0 MON * * *", "invalid cron '0 MON * * *': hour 'MON' is not a number"),
    ("0 0 * FOO *", "invalid cron '0 0 * FOO *': month 'FOO' is not a number or JAN-DEC"),
    ("0 0 * * JAN", "invalid cron '0 0 * * JAN': day-of-week 'JAN' is not a number or SUN-SAT"),
    ("5? * * * *", "invalid cron '5? * * * *': minute '5?' is not a value, range (a-b) or step (*/s, a-b/s)"),
    ("1-2-3 * * * *", "invalid cron '1-2-3 * * * *': minute '1-2-3' is not a value, range"),
    ("-1 * * * *", "invalid cron '-1 * * * *': minute '-1' is not a value"),
    ("*/x * * * *", "invalid cron '*/x * * * *': minute '*/x' is not a value"),
    ("1,,2 * * * *", "invalid cron '1,,2 * * * *': minute '1,,2' has an empty list item"),
    ("@reboot", "invalid cron '@reboot': unknown macro '@reboot'"),
    ("@daily 5", "invalid cron '@daily 5': unknown macro"),
    ("0 0 31 2 *", "invalid cron '0 0 31 2 *': never fires: day-of-month '31' does not occur in month '2' (FEB)"),
    ("0 0 30,31 FEB *", "never fires: day-of-month '30,31' does not occur in month 'FEB'"),
    ("0 0 31 4,6,9,11 *", "never fires"),
])
def test_errors_quote_the_expression_and_name_the_field_and_part(expression, message):
    with pytest.raises(CronError) as info:
        parse_cron(expression)
    assert str(info.value).startswith(message) or message in str(info.value)
    assert isinstance(info.value, ValueError)  # pydantic turns it into a field error


@pytest.mark.parametrize("value", [None, 5, ["0", "*", "*", "*", "*"]])
def test_a_non_string_is_refused(value):
    with pytest.raises(CronError, match=f"expected a string, got {type(value).__name__}"):
        parse_cron(value)


def test_expressions_that_can_fire_rarely_are_accepted():
    parse_cron("0 9 29 2 *")  # leap days only
    parse_cron("0 0 30 FEB,APR *")  # April 30 exists
    parse_cron("0 0 31 2 1")  # Vixie: both day fields restricted, so every Monday in February


# ---- matching -------------------------------------------------------------------------------------

def test_matches_minute_hour_month_and_weekday():
    spec = parse_cron("30 6 * JUN-AUG SAT,SUN")
    assert spec.matches(datetime(2026, 6, 6, 6, 30))  # a Saturday in June
    assert not spec.matches(datetime(2026, 6, 8, 6, 30))  # Monday
    assert not spec.matches(datetime(2026, 6, 6, 6, 31))
    assert not spec.matches(datetime(2026, 9, 5, 6, 30))  # Saturday in September
    assert parse_cron("0 0 * * 7").matches(datetime(2026, 3, 8))  # Sunday as 7


def test_vixie_rule_either_day_field_when_both_are_restricted():
    friday_13 = parse_cron("0 0 13 * FRI")  # the 13th OR any Friday
    assert friday_13.matches(datetime(2026, 2, 13))  # Friday the 13th
    assert friday_13.matches(datetime(2026, 1, 13))  # a Tuesday, but the 13th
    assert friday_13.matches(datetime(2026, 1, 16))  # a Friday, not the 13th
    assert not friday_13.matches(datetime(2026, 1, 14))

    # a day field starting with `*` is unrestricted (Vixie), so both must match
    odd_fridays = parse_cron("0 0 */2 * FRI")
    assert odd_fridays.matches(datetime(2026, 1, 9))  # Friday, odd
    assert not odd_fridays.matches(datetime(2026, 1, 16))  # Friday, even
    assert not odd_fridays.matches(datetime(2026, 1, 13))  # odd, Tuesday
    fridays = parse_cron("0 0 * * FRI")
    assert fridays.matches(datetime(2026, 1, 16)) and not fridays.matches(datetime(2026, 1, 13))
    days = parse_cron("0 0 13 * *")
    assert days.matches(datetime(2026, 1, 13)) and not days.matches(datetime(2026, 1, 16))


def test_spec_is_frozen_and_compares_by_fields():
    spec = parse_cron("0 6 * * *")
    with pytest.raises(AttributeError):
        spec.expression = "x"
    assert spec == parse_cron("0   6 * * *") and isinstance(spec, CronSpec)


# ---- fire times and DST -----------------------------------------------------------------------------

def test_window_is_start_exclusive_end_inclusive_and_needs_aware_times():
    spec = parse_cron("0 6 * * *")
    assert fire_times(spec, "UTC", utc(2026, 5, 1, 5, 59), utc(2026, 5, 1, 6, 0)) == [utc(2026, 5, 1, 6, 0)]
    assert fire_times(spec, "UTC", utc(2026, 5, 1, 6, 0), utc(2026, 5, 1, 6, 1)) == []
    assert fire_times(spec, "UTC", utc(2026, 5, 1, 6, 1), utc(2026, 5, 1, 6, 0)) == []
    # Lisbon summer time is UTC+1: 06:00 local is 05:00 UTC
    assert fire_times(spec, "Europe/Lisbon", utc(2026, 5, 1, 4, 59), utc(2026, 5, 1, 5, 0)) == [utc(2026, 5, 1, 5, 0)]
    with pytest.raises(ValueError, match="start must be timezone-aware"):
        fire_times(spec, "UTC", datetime(2026, 5, 1), utc(2026, 5, 2))
    with pytest.raises(CronError, match="unknown timezone 'Mars/Base'"):
        fire_times(spec, "Mars/Base", utc(2026, 5, 1), utc(2026, 5, 2))
    with pytest.raises(CronError, match="unknown timezone 'Mars/Base'"):
        next_fire_times(spec, "Mars/Base", utc(2026, 5, 1))


@pytest.mark.parametrize("tz, day, gap_end", [
    (NEW_YORK, (2026, 3, 8), utc(2026, 3, 8, 7, 0)),  # 02:00 EST → 03:00 EDT
    (BERLIN, (2026, 3, 29), utc(2026, 3, 29, 1, 0)),  # 02:00 CET → 03:00 CEST
])
def test_spring_forward_a_time_in_the_gap_fires_once_at_the_gap_end(tz, day, gap_end):
    start, end = local_day(tz, *day)
    assert fire_times(parse_cron("30 2 * * *"), tz, start, end) == [gap_end]
    assert gap_end.astimezone(tz).hour == 3 and gap_end.astimezone(tz).minute == 0
    # several gap minutes matching, and 03:00 itself: still one run at the gap's end
    assert fire_times(parse_cron("*/15 2 * * *"), tz, start, end) == [gap_end]
    assert fire_times(parse_cron("0,30 2,3 * * *"), tz, start, end) == [gap_end, gap_end + timedelta(minutes=30)]
    # the day before and after: 02:30 local as usual
    before = fire_times(parse_cron("30 2 * * *"), tz, start - timedelta(days=1), start)
    assert [t.astimezone(tz).strftime("%H:%M") for t in before] == ["02:30"]


@pytest.mark.parametrize("tz, day, first", [
    (NEW_YORK, (2026, 11, 1), utc(2026, 11, 1, 5, 30)),  # 01:30 EDT; 01:30 EST (06:30 UTC) does not fire
    (BERLIN, (2026, 10, 25), utc(2026, 10, 25, 0, 30)),  # 02:30 CEST; 02:30 CET (01:30 UTC) does not fire
])
def test_fall_back_a_repeated_time_fires_at_its_first_occurrence_only(tz, day, first):
    hour = first.astimezone(tz).hour
    start, end = local_day(tz, *day)
    assert fire_times(parse_cron(f"30 {hour} * * *"), tz, start, end) == [first]
    assert first.astimezone(tz).fold == 0
    # a window from inside the first pass to inside the second: the first pass's later minutes fire,
    # the second pass's do not
    quarter = parse_cron("*/15 * * * *")
    assert fire_times(quarter, tz, first, first + timedelta(hours=1)) == [first + timedelta(minutes=15)]
    assert fire_times(quarter, tz, first + timedelta(hours=1), first + timedelta(hours=1, minutes=40)) == [
        first + timedelta(hours=1, minutes=30)]  # the hour after the repeated one


def test_every_quarter_hour_across_both_new_york_transitions():
    spec = parse_cron("*/15 * * * *")
    spring = fire_times(spec, NEW_YORK, *local_day(NEW_YORK, 2026, 3, 8))
    assert len(spring) == 23 * 4  # a 23-hour day
    assert utc(2026, 3, 8, 7, 0) in spring and utc(2026, 3, 8, 6, 45) in spring
    assert all(b - a == timedelta(minutes=15) for a, b in zip(spring, spring[1:]))

    fall = fire_times(spec, NEW_YORK, *local_day(NEW_YORK, 2026, 11, 1))
    assert len(fall) == 24 * 4  # a 25-hour day, but the repeated hour's walls fire once
    steps = [b - a for a, b in zip(fall, fall[1:])]
    assert steps.count(timedelta(minutes=75)) == 1  # 01:45 EDT (05:45Z) → 02:00 EST (07:00Z)
    assert fall[fall.index(utc(2026, 11, 1, 5, 45)) + 1] == utc(2026, 11, 1, 7, 0)


@pytest.mark.parametrize("tz, day", [(NEW_YORK, (2026, 3, 8)), (NEW_YORK, (2026, 11, 1)), (BERLIN, (2026, 3, 29)),
                                     (BERLIN, (2026, 10, 25)), (ZoneInfo("Australia/Lord_Howe"), (2026, 4, 5))])
def test_one_minute_windows_add_up_to_the_whole_day(tz, day):
    """The scheduler asks one minute at a time; together the minutes give the day's fire times, no
    run lost or doubled at a switch (Lord Howe shifts by 30 minutes)."""
    start, end = local_day(tz, *day)
    for expression in ["* * * * *", "*/7 0-4 * * *", "30 1,2 * * *"]:
        spec = parse_cron(expression)
        by_minute = []
        t = start
        while t < end:
            by_minute += fire_times(spec, tz, t, t + timedelta(minutes=1))
            t += timedelta(minutes=1)
        assert by_minute == fire_times(spec, tz, start, end), expression


def test_a_one_minute_window_is_cheap():
    spec = parse_cron("0 9 29 2 *")  # rare: must not search ahead for its next day
    t0 = time.perf_counter()
    for minute in range(1000):
        fire_times(spec, NEW_YORK, utc(2026, 5, 1) + timedelta(minutes=minute), utc(2026, 5, 1) + timedelta(minutes=minute + 1))
    assert time.perf_counter() - t0 < 1.0  # ~15 µs each; a search ahead would take seconds


def test_next_fire_times_finds_leap_days_fast():
    t0 = time.perf_counter()
    leap = next_fire_times(parse_cron("0 9 29 2 *"), BERLIN, utc(2026, 3, 1), count=3)
    assert time.perf_counter() - t0 < 0.5  # minute by minute would be 4 million steps
    assert leap == [utc(2028, 2, 29, 8, 0), utc(2032, 2, 29, 8, 0), utc(2036, 2, 29, 8, 0)]
    # a leap day that is also a Sunday (`*/7` starts with `*`, so both fields must match): 28 years apart
    sundays = next_fire_times(parse_cron("0 12 29 2 */7"), "UTC", utc(2026, 1, 1), count=2)
    assert sundays == [utc(2032, 2, 29, 12, 0), utc(2060, 2, 29, 12, 0)]


def test_next_fire_times_follow_the_dst_rules():
    spring = next_fire_times(parse_cron("30 2 * * *"), NEW_YORK, utc(2026, 3, 7, 12), count=3)
    assert spring == [utc(2026, 3, 8, 7, 0), utc(2026, 3, 9, 6, 30), utc(2026, 3, 10, 6, 30)]
    fall = next_fire_times(parse_cron("30 1 * * *"), NEW_YORK, utc(2026, 10, 31, 12), count=2)
    assert fall == [utc(2026, 11, 1, 5, 30), utc(2026, 11, 2, 6, 30)]
    # asked from inside the repeated hour's second pass: 01:30 already ran, next is tomorrow
    assert next_fire_times(parse_cron("30 1 * * *"), NEW_YORK, utc(2026, 11, 1, 6, 0), count=1) == [utc(2026, 11, 2, 6, 30)]
    assert next_fire_times(parse_cron("0 6 * * *"), "UTC", utc(2026, 5, 1, 6, 0), count=1) == [utc(2026, 5, 2, 6, 0)]
    assert next_fire_times(parse_cron("0 6 * * *"), "UTC", utc(2026, 5, 1, 6, 0), count=0) == []


# ---- the property test --------------------------------------------------------------------------------

def reference_fire_times(spec: CronSpec, tz: ZoneInfo, start: datetime, end: datetime) -> list[datetime]:
    """Brute force, independent of the implementation: walk every UTC minute; fire at u if u's wall
    time matches and is its first occurrence, or if the wall clock jumped over a matching minute
    on the way to u (a spring-forward gap)."""
    out = []
    u = start.replace(second=0, microsecond=0) + timedelta(minutes=1)
    previous = (u - timedelta(minutes=1)).astimezone(tz).replace(tzinfo=None, fold=0)
    while u <= end:
        local = u.astimezone(tz)
        wall = local.replace(tzinfo=None, fold=0)
        fires = spec.matches(wall) and local.fold == 0
        skipped = previous + timedelta(minutes=1)
        while not fires and skipped < wall:  # wall minutes that never happened
            fires = spec.matches(skipped)
            skipped += timedelta(minutes=1)
        if fires:
            out.append(u)
        previous = wall
        u += timedelta(minutes=1)
    return out


def random_field(rng: random.Random, lo: int, hi: int) -> str:
    kind = rng.choice(["*", "value", "range", "star_step", "range_step", "list"])
    a, b = sorted(rng.sample(range(lo, hi + 1), 2))
    return {"*": "*", "value": str(a), "range": f"{a}-{b}", "star_step": f"*/{rng.randint(2, 9)}",
            "range_step": f"{a}-{b}/{rng.randint(1, 4)}",
            "list": ",".join(sorted({str(rng.randint(lo, hi)) for _ in range(3)}, key=int))}[kind]


@pytest.mark.parametrize("seed", range(8))
def test_fire_times_match_a_minute_by_minute_reference_over_a_random_month(seed):
    rng = random.Random(seed)
    tz = ZoneInfo(rng.choice(["America/New_York", "Europe/Berlin", "Australia/Lord_Howe", "America/Sao_Paulo",
                              "Pacific/Chatham", "Asia/Kolkata", "UTC"]))
    # early-morning hours and the months with DST switches, so the switches are exercised
    hours = rng.choice(["*", "0-4", "1,2,3", "2", random_field(rng, 0, 23)])
    expression = " ".join([random_field(rng, 0, 59), hours, rng.choice(["*", random_field(rng, 1, 31)]), "*",
                           rng.choice(["*", random_field(rng, 0, 7)])])
    spec = parse_cron(expression)
    year, month = rng.choice([2018, 2024, 2026]), rng.choice([3, 4, 9, 10, 11])
    start = datetime(year, month, 1, tzinfo=UTC) - timedelta(hours=14, seconds=rng.randint(0, 59))
    end = start + timedelta(days=32)
    expected = reference_fire_times(spec, tz, start, end)
    assert fire_times(spec, tz, start, end) == expected, (expression, tz.key, year, month)
    if expected:
        assert next_fire_times(spec, tz, start, count=3) == expected[:3]
