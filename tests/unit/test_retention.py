"""retention.py: the expiry plan, on synthetic repositories.

The property tests simulate a cluster's life (writes, backups, failovers, restores that branch from an
earlier point, a few segments lost from the archive, a history file missing) and check the plan
against restore's own reasoning (window.py: lineages, unbroken WAL runs, the backup restore picks
for a target time), never against retention.py's internals:

- guarantee 5: every kept backup that could be restored on some timeline still can; every moment of
  the PITR window that could be restored still can, as far along the WAL as before; min_backups and
  pins are honoured; history files are never deleted; nothing at or after the newest backup's start;
- GFS: exactly the newest backup of each of the N most recent day/week/month buckets carries that reason;
- expire is idempotent: planning again after the plan was carried out deletes nothing more.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgvault.catalog import BackupRecord, StoredObject
from pgvault.config import RetentionConfig
from pgvault.expire import facts_of
from pgvault.pg.wal import Lsn, TimelineSwitch, WalSegment, is_history, is_segment
from pgvault.retention import Inventory, Plan, plan_expiry, wal_position, wal_ranges
from pgvault.window import BackupReach, ancestry, reachable_backups

SEG = 16 * 1024 * 1024
T0 = datetime(2026, 1, 5, 2, 0, tzinfo=UTC)
ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata", "Pacific/Chatham", "Australia/Lord_Howe"]


def record(backup_id: str, *, timeline: int, start: int, stop: int, start_time: datetime,
           stop_time: datetime) -> BackupRecord:
    return BackupRecord(
        id=backup_id, cluster="test", system_id="7300000000000000001", pg_version=150000, timeline=timeline,
        start_lsn=str(Lsn(start)), stop_lsn=str(Lsn(stop)), checkpoint_lsn=str(Lsn(start)),
        start_time=start_time, stop_time=stop_time,
        start_wal=WalSegment.containing(timeline, Lsn(start), SEG).name,
        stop_wal=WalSegment.containing(timeline, Lsn(stop - 1), SEG).name,
        next_xid=1000, label=f"pgvault {backup_id}", parts=[],
        manifest=StoredObject(key=f"test/backups/{backup_id}/backup_manifest.zst", size=1, sha256="0" * 64),
        raw_size=1, stored_size=1, duration_s=1.0, compression={"type": "zstd", "level": 3},
        pgvault_version="0.1.0",
    )


@dataclass
class World:
    """A repository's contents, as the catalog would give them."""

    backups: list[BackupRecord] = field(default_factory=list)
    segments: set[tuple[int, int]] = field(default_factory=set)
    others: set[str] = field(default_factory=set)  # .partial and .backup files
    histories: dict[int, list[TimelineSwitch]] = field(default_factory=dict)
    pins: frozenset[str] = frozenset()

    def wal(self) -> list[str]:
        names = {WalSegment(t, n, SEG).name for t, n in self.segments} | self.others
        names |= {f"{t:08X}.history" for t in self.histories}
        return sorted(names)

    def inventory(self) -> Inventory:
        return Inventory(backups=[facts_of(b) for b in self.backups], wal=self.wal(), histories=self.histories,
                         pins=self.pins, segment_size=SEG)

    def catalog_order(self) -> list[BackupRecord]:
        return sorted(self.backups, key=lambda b: (b.stop.value, b.stop_time))

    def present(self) -> dict[int, set[int]]:
        found: dict[int, set[int]] = {}
        for t, n in self.segments:
            found.setdefault(t, set()).add(n)
        return found

    def timelines(self) -> set[int]:
        known = {1, *self.histories, *(t for t, _ in self.segments), *(b.timeline for b in self.backups)}
        known |= {s.parent for h in self.histories.values() for s in h}
        return known

    def after(self, plan: Plan) -> World:
        """The repository once the plan is carried out."""
        gone = set(plan.deleted_wal)
        return World(
            backups=[b for b in self.backups if b.id not in plan.deleted],
            segments={(t, n) for t, n in self.segments if WalSegment(t, n, SEG).name not in gone},
            others={name for name in self.others if name not in gone},
            histories={t: h for t, h in self.histories.items() if f"{t:08X}.history" not in gone},
            pins=self.pins,
        )

    def reach(self, timeline: int) -> list[BackupReach]:
        """Restore's view: the backups restorable on `timeline`, in catalog order."""
        return reachable_backups(self.catalog_order(), ancestry(timeline, self.histories.get(timeline, [])),
                                 self.present(), SEG)


# ---- a cluster's life, simulated ------------------------------------------------------------------

@st.composite
def worlds(draw: st.DrawFn, *, branching: bool = True) -> tuple[World, datetime]:
    """Returns the repository and the moment its history ends."""
    world = World()
    timeline, pos, now = 1, SEG + 0x28, T0 + timedelta(seconds=draw(st.integers(0, 86400)))
    kinds = ["write", "write", "backup", "backup", "backup", "backup"] + (["failover", "branch"] if branching else [])

    def switch() -> None:
        """The current segment is complete and archived; the next record starts in the next one."""
        nonlocal pos
        world.segments.add((timeline, pos // SEG))
        pos = (pos // SEG + 1) * SEG + 0x28

    for step, kind in enumerate(draw(st.lists(st.sampled_from(kinds), min_size=2, max_size=30))):
        now += timedelta(seconds=draw(st.integers(60, 4 * 86400)))
        if kind == "write":
            for _ in range(draw(st.integers(1, 4))):
                switch()
        elif kind == "backup":
            switch()  # BASE_BACKUP starts with a segment switch
            start, started = pos, now
            for _ in range(draw(st.integers(0, 2))):
                switch()
            pos += 0x100
            now += timedelta(seconds=draw(st.integers(1, 7200)))
            world.backups.append(record(f"B{step:02d}", timeline=timeline, start=start, stop=pos,
                                        start_time=started, stop_time=now))
            world.others.add(f"{WalSegment.containing(timeline, Lsn(start), SEG).name}.{start % SEG:08X}.backup")
            switch()  # and ends with one
        elif kind == "failover":
            if draw(st.booleans()):  # the old primary's unfinished last segment
                world.others.add(f"{WalSegment.containing(timeline, Lsn(pos), SEG).name}.partial")
            new = max(world.timelines() | {timeline}) + 1
            world.histories[new] = [*world.histories.get(timeline, []),
                                    TimelineSwitch(timeline, Lsn(pos), "promoted")]
            timeline = new
        else:  # a restore to an earlier point that then ran as the new primary: a branch
            spans = ancestry(timeline, world.histories.get(timeline, []))
            point = draw(st.integers(SEG + 0x28, pos))
            parent = next(s.timeline for s in spans if s.begin.value <= point <= s.end.value)
            new = max(world.timelines() | {timeline}) + 1
            world.histories[new] = [*world.histories.get(parent, []),
                                    TimelineSwitch(parent, Lsn(point), "before 2026-11-20 14:30:00+00")]
            timeline, pos = new, point
    # Damage: a few segments lost from the archive, mostly between backups (which cuts WAL runs
    # short), now and then inside one (which makes that backup unrestorable), or a history file.
    inside = {(b.timeline, n) for b in world.backups for n in range(WalSegment.parse(b.start_wal, SEG).number,
                                                                     WalSegment.parse(b.stop_wal, SEG).number + 1)}
    between = sorted(world.segments - inside)
    for lost in draw(st.lists(st.sampled_from(between), max_size=3)) if between else []:
        world.segments.discard(lost)
    if world.segments and draw(st.integers(0, 4)) == 0:
        world.segments.discard(draw(st.sampled_from(sorted(world.segments))))
    if world.histories and draw(st.integers(0, 9)) == 0:
        del world.histories[draw(st.sampled_from(sorted(world.histories)))]
    ids = [b.id for b in world.backups]
    pins = set(draw(st.lists(st.sampled_from(ids), max_size=2))) if ids else set()
    if draw(st.integers(0, 9)) == 0:
        pins.add("B99-gone")
    world.pins = frozenset(pins)
    return world, now


@st.composite
def scenarios(draw: st.DrawFn, *, branching: bool = True) -> tuple[World, RetentionConfig, datetime]:
    world, end = draw(worlds(branching=branching))
    # Mostly soon after the last event, sometimes long after (everything outside the window) or before
    # it (backups "from the future").
    now = end + timedelta(seconds=draw(st.one_of(st.integers(-3600, 2 * 86400), st.integers(-3 * 86400, 90 * 86400))))
    # A window beginning anywhere in the history, or none. Small GFS counts more often than large
    # ones: those leave the window alone to keep what restores it.
    history = max(int((now - T0).total_seconds()), 0)
    policy = RetentionConfig(daily=draw(st.sampled_from([0, 0, 1, 2, 3, 7])),
                             weekly=draw(st.sampled_from([0, 0, 1, 2, 4])),
                             monthly=draw(st.sampled_from([0, 0, 1, 3])), min_backups=draw(st.integers(1, 4)),
                             pitr_window=timedelta(seconds=draw(st.integers(0, history + 86400))),
                             timezone=draw(st.sampled_from(ZONES)))
    return world, policy, now


PROPERTY = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def newest_first(backups: Sequence[BackupRecord]) -> list[BackupRecord]:
    return sorted(backups, key=lambda b: (b.stop_time, b.stop.value, b.id), reverse=True)


# ---- properties ---------------------------------------------------------------------------------

@PROPERTY
@given(scenarios())
def test_every_backup_is_kept_with_a_reason_or_deleted_and_pins_and_min_backups_hold(
        scenario: tuple[World, RetentionConfig, datetime]) -> None:
    world, policy, now = scenario
    plan = plan_expiry(world.inventory(), policy, now)
    kept = {k.id for k in plan.kept}
    assert kept.isdisjoint(plan.deleted)
    assert kept | set(plan.deleted) == {b.id for b in world.backups}
    assert all(k.reasons for k in plan.kept)
    for b in world.backups:
        if b.id in world.pins:
            assert "pinned" in plan.reasons(b.id)
    for b in newest_first(world.backups)[:policy.min_backups]:
        assert "min_backups" in plan.reasons(b.id)
    for b in world.backups:
        if b.stop_time > now:
            assert "future" in plan.reasons(b.id)
    assert set(plan.stale_pins) == world.pins - {b.id for b in world.backups}
    # Only WAL files that exist, never a history file, never a name retention does not understand.
    assert set(plan.deleted_wal) <= set(world.wal())
    assert all(wal_position(name, SEG) is not None and not is_history(name) for name in plan.deleted_wal)
    assert plan.kept_wal + len(plan.deleted_wal) == len(world.wal())


@PROPERTY
@given(scenarios())
def test_gfs_keeps_exactly_the_newest_backup_of_each_of_the_most_recent_buckets(
        scenario: tuple[World, RetentionConfig, datetime]) -> None:
    world, policy, now = scenario
    plan = plan_expiry(world.inventory(), policy, now)
    zone = ZoneInfo(policy.timezone)
    for kind, count in (("daily", policy.daily), ("weekly", policy.weekly), ("monthly", policy.monthly)):
        expected: dict[str, str] = {}
        seen: set[str] = set()
        for b in newest_first(world.backups):  # newest first: the first backup met in a bucket is its newest
            local = b.stop_time.astimezone(zone)
            year, week, _ = local.isocalendar()
            label = {"daily": f"{local:%Y-%m-%d}", "weekly": f"{year}-W{week:02d}", "monthly": f"{local:%Y-%m}"}[kind]
            if label not in seen:
                seen.add(label)
                if len(seen) <= count:
                    expected[b.id] = f"{kind} {label}"
        got = {k.id: r for k in plan.kept for r in k.reasons if r.startswith(f"{kind} ")}
        assert got == expected
        assert len(got) == min(count, len(seen))


@PROPERTY
@given(scenarios())
def test_every_kept_backup_stays_restorable_on_every_timeline_it_could_be_restored_on(
        scenario: tuple[World, RetentionConfig, datetime]) -> None:
    world, policy, now = scenario
    plan = plan_expiry(world.inventory(), policy, now)
    after = world.after(plan)
    kept = {k.id for k in plan.kept}
    for timeline in world.timelines():
        before_ids = {r.backup.id for r in world.reach(timeline)} & kept
        after_ids = {r.backup.id for r in after.reach(timeline)}
        assert before_ids <= after_ids, f"timeline {timeline}: {sorted(before_ids - after_ids)} lost their WAL"


@PROPERTY
@given(scenarios())
def test_every_moment_of_the_pitr_window_stays_restorable(scenario: tuple[World, RetentionConfig, datetime]) -> None:
    world, policy, now = scenario
    plan = plan_expiry(world.inventory(), policy, now)
    after = world.after(plan)
    cutoff = now - policy.pitr_window
    for timeline in world.timelines():
        # Replaced before the window began (a backup on a higher timeline had started by then): the
        # module docstring's rule; its history before the switch is its successors' lineage.
        if any(b.timeline > timeline and b.start_time <= cutoff for b in world.backups):
            continue
        before_reach, after_reach = world.reach(timeline), after.reach(timeline)
        moments = {cutoff, now, *(b.stop_time for b in world.backups if cutoff <= b.stop_time <= now)}
        for moment in sorted(moments):
            # What restore --target-time picks (window.choose_for_time), and how far its WAL runs.
            before = [r for r in before_reach if r.backup.stop_time <= moment]
            if not before:
                continue
            picked = [r for r in after_reach if r.backup.stop_time <= moment]
            assert picked, f"timeline {timeline}: nothing restores {moment} any more"
            assert picked[-1].wal_end.number >= before[-1].wal_end.number, (
                f"timeline {timeline}, {moment}: WAL from {picked[-1].backup.id} ends at {picked[-1].wal_end}, "
                f"from {before[-1].backup.id} it reached {before[-1].wal_end}")
        at_cutoff = [r for r in before_reach if r.backup.stop_time <= cutoff]
        if at_cutoff:
            assert "pitr" in plan.reasons(at_cutoff[-1].backup.id)


@PROPERTY
@given(scenarios())
def test_no_wal_at_or_after_the_newest_backups_start_is_deleted(
        scenario: tuple[World, RetentionConfig, datetime]) -> None:
    world, policy, now = scenario
    plan = plan_expiry(world.inventory(), policy, now)
    if not world.backups:
        assert plan.deleted_wal == ()
        return
    newest = newest_first(world.backups)[0]
    floor = WalSegment.parse(newest.start_wal, SEG).number
    assert all(wal_position(name, SEG)[1] < floor for name in plan.deleted_wal)  # type: ignore[index]


@PROPERTY
@given(scenarios())
def test_expire_is_idempotent(scenario: tuple[World, RetentionConfig, datetime]) -> None:
    world, policy, now = scenario
    plan = plan_expiry(world.inventory(), policy, now)
    again = plan_expiry(world.after(plan).inventory(), policy, now)
    assert again.deleted == ()
    assert again.deleted_wal == ()
    assert [(k.id, k.reasons) for k in again.kept] == [(k.id, k.reasons) for k in plan.kept]


@PROPERTY
@given(scenarios(branching=False))
def test_on_one_timeline_older_retained_backups_keep_only_the_wal_they_need(
        scenario: tuple[World, RetentionConfig, datetime]) -> None:
    """The other side of the coin: what is kept is there for a rule, nothing more."""
    world, policy, now = scenario
    plan = plan_expiry(world.inventory(), policy, now)
    if not world.backups:
        return
    kept = [b for b in world.backups if plan.reasons(b.id)]
    floor = WalSegment.parse(newest_first(world.backups)[0].start_wal, SEG).number
    pitr = [WalSegment.parse(b.start_wal, SEG).number for b in kept if "pitr" in plan.reasons(b.id)]
    window_from = min(pitr, default=floor)
    for name in set(world.wal()) - set(plan.deleted_wal):
        if is_history(name):
            continue
        _, number = wal_position(name, SEG)  # type: ignore[misc]
        needed = any(WalSegment.parse(b.start_wal, SEG).number <= number <= WalSegment.parse(b.stop_wal, SEG).number
                     for b in kept)
        assert number >= floor or number >= window_from or needed, f"{name} kept for no reason"


# ---- examples -----------------------------------------------------------------------------------

def linear(days: int, *, hour: int = 2, segments_between: int = 3) -> World:
    """One backup a day at `hour` UTC on timeline 1, with WAL written between them, all archived."""
    world = World()
    pos = SEG
    for day in range(days):
        start = pos + 0x28
        stop_time = T0.replace(hour=hour) + timedelta(days=day, minutes=10)
        world.backups.append(record(f"D{day:03d}", timeline=1, start=start, stop=start + 0x100,
                                    start_time=stop_time - timedelta(minutes=10), stop_time=stop_time))
        world.others.add(f"{WalSegment.containing(1, Lsn(start), SEG).name}.{start % SEG:08X}.backup")
        pos += SEG * (1 + segments_between)
    world.segments = {(1, n) for n in range(1, pos // SEG)}
    return world


def policy(**values: object) -> RetentionConfig:
    base: dict[str, object] = {"daily": 0, "weekly": 0, "monthly": 0, "min_backups": 1, "pitr_window": "0s"}
    return RetentionConfig.model_validate({**base, **values})


def test_seed_policy_keeps_7_days_4_weeks_6_months() -> None:
    world = linear(200)  # 2026-01-05 .. 2026-07-23, one backup a day
    plan = plan_expiry(world.inventory(), policy(daily=7, weekly=4, monthly=6, pitr_window="1s"),
                       datetime(2026, 7, 23, 12, 0, tzinfo=UTC))
    newest = plan.kept[0]
    assert newest.id == "D199"
    assert newest.reasons == ("min_backups", "daily 2026-07-23", "weekly 2026-W30", "monthly 2026-07", "pitr")
    daily = [k.id for k in plan.kept if any(r.startswith("daily") for r in k.reasons)]
    assert daily == [f"D{n}" for n in range(199, 192, -1)]
    weekly = {r for k in plan.kept for r in k.reasons if r.startswith("weekly")}
    assert weekly == {"weekly 2026-W30", "weekly 2026-W29", "weekly 2026-W28", "weekly 2026-W27"}
    assert plan.reasons("D188") == ("weekly 2026-W28",)  # Sunday 2026-07-12, the last day of ISO week 28
    monthly = {r for k in plan.kept for r in k.reasons if r.startswith("monthly")}
    assert monthly == {f"monthly 2026-{m:02d}" for m in range(2, 8)}
    assert plan.reasons("D054") == ("monthly 2026-02",)  # 2026-02-28
    assert len(plan.kept) == 7 + 2 + 5  # W30 and W29 end within the last 7 days; months do not overlap
    assert plan.summary.startswith(f"keep 14 backup(s), delete {200 - 14}")


def test_day_buckets_are_days_of_the_policys_time_zone() -> None:
    world = linear(3, hour=23)  # 23:10 UTC is already the next day in Berlin
    utc = plan_expiry(world.inventory(), policy(daily=3), datetime(2026, 1, 9, tzinfo=UTC))
    berlin = plan_expiry(world.inventory(), policy(daily=3, timezone="Europe/Berlin"), datetime(2026, 1, 9, tzinfo=UTC))
    assert utc.reasons("D000") == ("daily 2026-01-05",)
    assert berlin.reasons("D000") == ("daily 2026-01-06",)


def test_pitr_keeps_wal_from_the_newest_backup_before_the_window_and_only_consistency_wal_before() -> None:
    world = linear(5)  # backups in segments 1, 5, 9, 13, 17; WAL through segment 20
    plan = plan_expiry(world.inventory(), policy(pitr_window="2d", min_backups=1, daily=0),
                       datetime(2026, 1, 9, 12, 0, tzinfo=UTC))
    # Window from 2026-01-07 12:00: D002 (01-07 02:10) is the newest backup before it.
    assert plan.reasons("D002") == ("pitr",)
    assert plan.reasons("D004") == ("min_backups",)
    assert plan.deleted == ("D000", "D001", "D003")
    assert [(r.first_name, r.last_name, r.files) for r in plan.deleted_wal_ranges()] == [
        ("000000010000000000000001", "000000010000000000000008", 10)]  # 8 segments and 2 .backup files
    pinned = replace(world, pins=frozenset({"D000"}))
    plan = plan_expiry(pinned.inventory(), policy(pitr_window="2d"), datetime(2026, 1, 9, 12, 0, tzinfo=UTC))
    assert plan.reasons("D000") == ("pinned",)
    # D000 keeps its own segment (and .backup file) only.
    assert [(r.first_name, r.last_name) for r in plan.deleted_wal_ranges()] == [
        ("000000010000000000000002", "000000010000000000000008")]


def test_without_a_backup_before_the_window_the_oldest_backup_anchors_it() -> None:
    world = linear(3)
    plan = plan_expiry(world.inventory(), policy(pitr_window="30d"), datetime(2026, 1, 8, tzinfo=UTC))
    assert plan.reasons("D000") == ("pitr",)
    assert plan.deleted == ("D001",)
    assert plan.deleted_wal == ()


def test_a_gap_in_the_archive_keeps_the_first_backup_after_it() -> None:
    world = linear(5)
    world.segments.discard((1, 11))  # between D002 (segment 9) and D003 (segment 13)
    plan = plan_expiry(world.inventory(), policy(pitr_window="3d"), datetime(2026, 1, 9, 12, 0, tzinfo=UTC))
    # From D001 (the newest before the window) WAL only reaches segment 10; D003 restores what follows.
    assert plan.reasons("D001") == ("pitr",)
    assert plan.reasons("D003") == ("pitr",)
    assert plan.deleted == ("D000", "D002")


def test_no_backup_no_wal_deleted() -> None:
    world = World(segments={(1, n) for n in range(1, 30)})
    plan = plan_expiry(world.inventory(), policy(), datetime(2026, 1, 9, tzinfo=UTC))
    assert plan.deleted_wal == () and plan.kept == ()


def failover_world() -> World:
    """Timeline 1 until 0/A000100 (segment 10), then 2; a .partial of 1's last segment."""
    world = World(histories={2: [TimelineSwitch(1, Lsn(10 * SEG + 0x100), "promoted")]})
    world.segments = {(1, n) for n in range(1, 10)} | {(2, n) for n in range(10, 21)}
    world.others = {"00000001000000000000000A.partial"}
    world.backups = [
        record("A", timeline=1, start=2 * SEG + 0x28, stop=2 * SEG + 0x200, start_time=T0,
               stop_time=T0 + timedelta(minutes=5)),
        record("B", timeline=1, start=6 * SEG + 0x28, stop=6 * SEG + 0x200, start_time=T0 + timedelta(days=1),
               stop_time=T0 + timedelta(days=1, minutes=5)),
        record("C", timeline=2, start=15 * SEG + 0x28, stop=15 * SEG + 0x200, start_time=T0 + timedelta(days=3),
               stop_time=T0 + timedelta(days=3, minutes=5)),
    ]
    return world


def test_window_across_a_failover_keeps_the_parent_timelines_wal_up_to_the_switch() -> None:
    world = failover_world()
    plan = plan_expiry(world.inventory(), policy(pitr_window="3d"), T0 + timedelta(days=4, hours=12))
    # Window from day 1 12:00: B (timeline 1, day 1 00:05) is on timeline 2's lineage, the newest before it.
    assert plan.deleted == ("A",)
    assert plan.reasons("B") == ("pitr",)
    assert set(plan.deleted_wal) == {WalSegment(1, n, SEG).name for n in range(1, 6)}
    assert "00000001000000000000000A.partial" not in plan.deleted_wal  # timeline 1 is still in the window


def test_a_superseded_timeline_lets_its_last_backup_go() -> None:
    world = failover_world()
    plan = plan_expiry(world.inventory(), policy(pitr_window="1d"), T0 + timedelta(days=9))
    # The window begins on day 8, long after C started on timeline 2: timeline 1 was replaced before.
    assert plan.deleted == ("A", "B")
    assert {wal_position(n, SEG) for n in plan.deleted_wal} == {(1, n) for n in range(1, 11)} | {
        (2, n) for n in range(10, 15)}


def test_a_timeline_without_history_file_keeps_lower_timelines_too() -> None:
    world = failover_world()
    del world.histories[2]
    plan = plan_expiry(world.inventory(), policy(pitr_window="3d"), T0 + timedelta(days=3, hours=12))
    assert any("timeline 2 has no history file" in w for w in plan.warnings)
    # For PostgreSQL timeline 2 now has no parents, so C anchors its window; but none of timeline 2's
    # own WAL goes while its history is missing.
    assert plan.reasons("C") == ("min_backups", "pitr")
    assert plan.deleted_wal
    assert all(wal_position(n, SEG)[0] == 1 for n in plan.deleted_wal)  # type: ignore[index]


def test_a_backup_from_the_future_is_kept() -> None:
    world = linear(3)
    plan = plan_expiry(world.inventory(), policy(daily=0), datetime(2026, 1, 6, tzinfo=UTC))
    assert "future" in plan.reasons("D001") and "future" in plan.reasons("D002")


def test_stale_pins_are_reported_not_fatal() -> None:
    world = replace(linear(2), pins=frozenset({"gone"}))
    assert plan_expiry(world.inventory(), policy(), T0 + timedelta(days=5)).stale_pins == ("gone",)


def test_wal_ranges_collapse_consecutive_segments_per_timeline() -> None:
    names = [WalSegment(1, n, SEG).name for n in (1, 2, 3, 7)] + [WalSegment(2, 3, SEG).name,
                                                                  "000000010000000000000002.00000028.backup"]
    assert [(r.timeline, r.first_name, r.last_name, r.files) for r in wal_ranges(names, SEG)] == [
        (1, "000000010000000000000001", "000000010000000000000003", 4),
        (1, "000000010000000000000007", "000000010000000000000007", 1),
        (2, "000000020000000000000003", "000000020000000000000003", 1),
    ]


@pytest.mark.parametrize("name", ["00000002.history", "README", "000000010000000000000001.zst.tmp"])
def test_names_retention_does_not_own_are_never_deleted(name: str) -> None:
    world = linear(3)
    world.others.add(name)
    plan = plan_expiry(world.inventory(), policy(), T0 + timedelta(days=30))
    assert name not in plan.deleted_wal
    assert any(is_segment(n) for n in plan.deleted_wal)
