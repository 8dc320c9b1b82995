-- fluxrun schema 4 (SQLite): leases judged by the boot clock (see storage/_sqlite_lease.py).
-- Forward-only. lease_until stays the wall-clock expiry: RunRow shows it, and it judges the
-- leases written without a boot clock (all the leases held at this upgrade, say).
-- lease_boot: the boot id the lease was written in; lease_boot_until: its expiry on that
-- boot's CLOCK_BOOTTIME, in microseconds; lease_boot_fence: the fence they were written
-- for. They count only while lease_boot_fence equals fence, so a claim by a fluxrun that
-- predates schema 4 (it moves the fence, not these) is judged by its lease_until.
-- A plain step commit writes none of them; no index is needed (the leased runs are found
-- through flux_runs_lease on lease_until, which every lease still sets).
ALTER TABLE flux_runs ADD COLUMN lease_boot TEXT;
ALTER TABLE flux_runs ADD COLUMN lease_boot_until INTEGER;
ALTER TABLE flux_runs ADD COLUMN lease_boot_fence INTEGER;
