-- The list metrics of the recommended lists per arm and day, and over the whole experiment
-- (day 'all'): personalization@L, coverage@L and popularity@L (service/experiments/
-- list_metrics.py has the definitions).
--
-- Tables serve_log and event_log: the drained logs (service/event_log.py). Parameters
-- (DuckDB's spelling; bind them the way your warehouse does): $experiment; $top, L; and
-- $catalogue_size, the catalogue's item count, NULL for the distinct items served in the
-- logs' period. List syntax: UNNEST ... WITH ORDINALITY (SQL standard: DuckDB >= 1.4,
-- PostgreSQL, Trino; BigQuery spells it UNNEST ... WITH OFFSET).
--
-- A user's list for a day is the last list served to them that day (latest request ts, then
-- the latest stream entry), in the order returned: best first with top_k, else request order
-- (the serve log keeps no scores). Holdout users are left out, as from the counts.
WITH ranked AS (
    SELECT
        arm,
        day,
        user_id,
        items,
        ROW_NUMBER() OVER (PARTITION BY arm, day, user_id
                           ORDER BY ts DESC, stream_id DESC) AS nth_of_day,
        ROW_NUMBER() OVER (PARTITION BY arm, user_id
                           ORDER BY ts DESC, stream_id DESC) AS nth_of_all
    FROM serve_log
    WHERE experiment = $experiment AND holdout = FALSE
),
last_lists AS (
    SELECT arm, day, user_id, items FROM ranked WHERE nth_of_day = 1
    UNION ALL
    SELECT arm, 'all' AS day, user_id, items FROM ranked WHERE nth_of_all = 1
),
-- a user's top-L as a set (a request may name an item twice)
top_items AS (
    SELECT DISTINCT l.arm, l.day, l.user_id, t.item_id
    FROM last_lists AS l
    CROSS JOIN UNNEST(l.items) WITH ORDINALITY AS t(item_id, pos)
    WHERE t.pos <= $top
),
lists AS (
    SELECT arm, day, COUNT(*) AS users, MAX(n) AS top, AVG(n) AS mean_length
    FROM (SELECT arm, day, user_id, COUNT(*) AS n FROM top_items GROUP BY arm, day, user_id)
        AS user_tops
    GROUP BY arm, day
),
-- c users have the item in their top-L: it is shared by c(c - 1) ordered pairs of users, so
-- the mean overlap over all pairs needs no pair enumeration
overlap AS (
    SELECT arm, day, COUNT(*) AS distinct_items, SUM(c * (c - 1)) AS shared
    FROM (SELECT arm, day, item_id, COUNT(*) AS c FROM top_items GROUP BY arm, day, item_id)
        AS item_users
    GROUP BY arm, day
),
catalogue AS (
    SELECT COALESCE(CAST($catalogue_size AS BIGINT), COUNT(DISTINCT t.item_id)) AS size
    FROM serve_log AS s
    CROSS JOIN UNNEST(s.items) AS t(item_id)
    WHERE s.experiment = $experiment
),
-- the counted downloads of the period (the A/B report's: every arm, holdout excluded)
downloads AS (
    SELECT item_id, COUNT(*) AS n
    FROM (SELECT DISTINCT arm, stream_id, item_id FROM event_log
          WHERE experiment = $experiment AND type = 'download' AND holdout = FALSE)
        AS counted
    GROUP BY item_id
),
-- the mean share of the slots' items, as one division of integers (mean of n_i / N =
-- Σ n_i / (slots · N)): exact, so the same logs give the same figure whatever order a parallel
-- engine adds the slots up in (an average of floats can differ in the last digit)
mean_popularity AS (
    SELECT t.arm, t.day,
           CAST(SUM(COALESCE(d.n, 0)) AS DOUBLE)
               / (COUNT(*) * (SELECT SUM(n) FROM downloads)) AS popularity
    FROM top_items AS t
    LEFT JOIN downloads AS d ON d.item_id = t.item_id
    GROUP BY t.arm, t.day
)
SELECT
    l.arm,
    l.day,
    l.users,
    l.top,
    l.mean_length,
    CASE WHEN l.users > 1
         THEN 1 - CAST(o.shared AS DOUBLE) / (l.users * (l.users - 1) * l.top) END
        AS personalization,
    CAST(o.distinct_items AS DOUBLE) / c.size AS coverage,
    CASE WHEN (SELECT COUNT(*) FROM downloads) > 0 THEN m.popularity END AS popularity,
    o.distinct_items,
    c.size AS catalogue,
    (SELECT COALESCE(SUM(n), 0) FROM downloads) AS downloads
FROM lists AS l
JOIN overlap AS o ON o.arm = l.arm AND o.day = l.day
JOIN mean_popularity AS m ON m.arm = l.arm AND m.day = l.day
CROSS JOIN catalogue AS c
ORDER BY l.day, l.arm
