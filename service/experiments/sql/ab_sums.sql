-- The A/B report's user-level sums per arm and day, and over the whole experiment (day 'all',
-- each user once): the six sums ctrserve's online counters keep in Redis (service/counts.py),
-- which the report's statistics need (service/experiments/stats.py, ArmStats).
--
-- Table event_log: the drained event log (service/event_log.py, EVENTS_SCHEMA), one row per
-- accepted event. Parameter $experiment (DuckDB's spelling; bind it the way your warehouse
-- does). List function: cardinality() (SQL standard: DuckDB >= 2.0, PostgreSQL, Trino, Spark;
-- BigQuery spells it ARRAY_LENGTH, Snowflake ARRAY_SIZE).
--
-- The online rules, and how they hold here:
--   duplicates within the dedup window, malformed, unproven, expired and log_full events:
--     rejected before the log, so the log holds only what was counted (service/events.py);
--   holdout users: logged, never counted (holdout = FALSE);
--   the drainer is at-least-once (a crash may write an entry twice): one row per stream entry
--     (experiment, arm, stream_id), so an event id accepted again after its dedup window
--     counts twice, exactly as it did online;
--   an impression adds its items to x_u, a download adds 1 to y_u; the day is the scored
--     request's day from the attribution claims, not the event's ts;
--   a user is counted in a day (and in the total) from their first counted event.
WITH counted AS (
    SELECT DISTINCT
        arm,
        stream_id,
        user_id,
        day,
        CASE WHEN type = 'impression' THEN cardinality(items) ELSE 0 END AS x,
        CASE WHEN type = 'download' THEN 1 ELSE 0 END AS y
    FROM event_log
    WHERE experiment = $experiment AND holdout = FALSE
),
per_user AS (
    SELECT arm, day, user_id, SUM(x) AS x, SUM(y) AS y
    FROM counted
    GROUP BY arm, day, user_id
    UNION ALL
    SELECT arm, 'all' AS day, user_id, SUM(x) AS x, SUM(y) AS y
    FROM counted
    GROUP BY arm, user_id
)
SELECT
    arm,
    day,
    COUNT(*) AS users,
    SUM(x) AS impressions,
    SUM(y) AS downloads,
    SUM(x * x) AS sum_x2,
    SUM(y * y) AS sum_y2,
    SUM(x * y) AS sum_xy
FROM per_user
GROUP BY arm, day
ORDER BY day, arm
