-- CUPED's sums per arm (service/experiments/cuped.py, CupedStats): for each user counted in
-- the experiment from $start on, w = (1, x, y, pre_x, pre_y, has_pre), and per arm the sums of
-- every product of two of them: Σ1 (users), Σx, ..., Σx·x, Σx·y, ..., Σhas_pre·has_pre.
--
-- x, y: the user's impressions (items shown) and downloads in the experiment, by the rules of
-- ab_sums.sql (non-holdout, one row per stream entry), on the days from $start on; with $start
-- the experiment's first day these are the report's total, user for user.
-- pre_x, pre_y: the same user's impressions and downloads logged on the days
-- [$pre_start, $start), in any experiment and arm, holdout included: the log holds every
-- scored request's events, so this is the user's activity before the start. has_pre = 1 when
-- the user has any such row; users without (new users) have 0, 0, 0.
--
-- Parameters $experiment, $start and $pre_start ('YYYY-MM-DD', compared as text as the log's
-- `day` is). List function cardinality() as in ab_sums.sql.
WITH counted AS (
    SELECT DISTINCT
        arm,
        stream_id,
        user_id,
        CASE WHEN type = 'impression' THEN cardinality(items) ELSE 0 END AS x,
        CASE WHEN type = 'download' THEN 1 ELSE 0 END AS y
    FROM event_log
    WHERE experiment = $experiment AND holdout = FALSE AND day >= $start
),
in_experiment AS (
    SELECT arm, user_id, SUM(x) AS x, SUM(y) AS y
    FROM counted
    GROUP BY arm, user_id
),
pre_rows AS (
    SELECT DISTINCT
        experiment,
        arm,
        stream_id,
        user_id,
        CASE WHEN type = 'impression' THEN cardinality(items) ELSE 0 END AS x,
        CASE WHEN type = 'download' THEN 1 ELSE 0 END AS y
    FROM event_log
    WHERE day >= $pre_start AND day < $start
),
pre_period AS (
    SELECT user_id, SUM(x) AS pre_x, SUM(y) AS pre_y
    FROM pre_rows
    GROUP BY user_id
),
per_user AS (
    SELECT
        e.arm,
        e.x,
        e.y,
        COALESCE(p.pre_x, 0) AS pre_x,
        COALESCE(p.pre_y, 0) AS pre_y,
        CASE WHEN p.user_id IS NULL THEN 0 ELSE 1 END AS has_pre
    FROM in_experiment AS e
    LEFT JOIN pre_period AS p ON p.user_id = e.user_id
)
SELECT
    arm,
    COUNT(*) AS users,
    SUM(x) AS x,
    SUM(y) AS y,
    SUM(pre_x) AS pre_x,
    SUM(pre_y) AS pre_y,
    SUM(has_pre) AS has_pre,
    SUM(x * x) AS x_x,
    SUM(x * y) AS x_y,
    SUM(x * pre_x) AS x_pre_x,
    SUM(x * pre_y) AS x_pre_y,
    SUM(x * has_pre) AS x_has_pre,
    SUM(y * y) AS y_y,
    SUM(y * pre_x) AS y_pre_x,
    SUM(y * pre_y) AS y_pre_y,
    SUM(y * has_pre) AS y_has_pre,
    SUM(pre_x * pre_x) AS pre_x_pre_x,
    SUM(pre_x * pre_y) AS pre_x_pre_y,
    SUM(pre_x * has_pre) AS pre_x_has_pre,
    SUM(pre_y * pre_y) AS pre_y_pre_y,
    SUM(pre_y * has_pre) AS pre_y_has_pre,
    SUM(has_pre * has_pre) AS has_pre_has_pre
FROM per_user
GROUP BY arm
ORDER BY arm
