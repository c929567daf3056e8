#!/bin/sh
# One-shot set-up of the compose stack (docker-compose.yml, service `setup`), so that
# `docker compose up` has something to serve: a synthetic world, models trained on it and
# exported into the registry, the world's user and app features in Redis, and an experiments
# file serving the models as equal arms, the first (LR) as the control arm, named `control`
# (the uplift recording rules find it by its `control: true`, exported as
# ctrserve_arm_weight{control="true"}, whatever its name).
#
# Idempotent: the world, each trained run and the experiments file are made once; the features
# are loaded on every start (cheap, and the Redis volume may be new). Delete
# $CTRSERVE_DATA/experiments.yaml to choose other models.
#
# Settings (environment): CTRSERVE_DATA (default /data), CTRSERVE_REGISTRY (default
# $CTRSERVE_DATA/registry), CTRSERVE_EXPERIMENT (default ranker), REDIS_URL (without it, the
# registry's embedded Redis), SETUP_MODELS (default "lr deepfm"), SETUP_EPOCHS (3),
# SETUP_SEED (2026), SETUP_DAYS (10), SETUP_IMPRESSIONS_PER_DAY (50000).
set -eu

data=${CTRSERVE_DATA:-/data}
registry=${CTRSERVE_REGISTRY:-$data/registry}
experiment=${CTRSERVE_EXPERIMENT:-ranker}
world=$data/world
experiments=$data/experiments.yaml
export CTRSERVE_REGISTRY="$registry"

say() { echo "setup: $*" >&2; }

if [ ! -f "$world/world.json" ]; then
    say "synthetic world -> $world"
    ctrserve synth --out "$world" --seed "${SETUP_SEED:-2026}" --days "${SETUP_DAYS:-10}" \
        --impressions-per-day "${SETUP_IMPRESSIONS_PER_DAY:-50000}" --no-progress
fi

if [ -f "$experiments" ]; then
    say "$experiments exists: models already trained"
else
    arms=
    for model in ${SETUP_MODELS:-lr deepfm}; do
        run=$data/runs/$model
        if [ ! -f "$run/run.json" ]; then
            say "training $model -> $run"
            ctrserve train --model "$model" --data "synth:$world" --out "$run" \
                --epochs "${SETUP_EPOCHS:-3}" --no-progress
        fi
        bundle=$(ctrserve export "$run" --registry "$registry")
        say "$model exported: $bundle"
        arms="$arms ${bundle##*/}"
    done
    # One experiment, equal weights (they add up to exactly 1), the first bundle the control.
    # shellcheck disable=SC2086  # $arms: one argument per bundle
    python - "$experiment" $arms > "$experiments.tmp" <<'EOF'
import sys

experiment, bundles = sys.argv[1], sys.argv[2:]
weights = [round(1 / len(bundles), 4)] * (len(bundles) - 1)
weights.append(round(1 - sum(weights), 4))
print("experiments:")
print(f"  - name: {experiment}")
print(f"    salt: {experiment}-compose")
print("    arms:")
for i, (bundle, weight) in enumerate(zip(bundles, weights)):
    name = "control" if i == 0 else bundle.rsplit("-", 1)[0]  # the model type
    control = ", control: true" if i == 0 else ""
    print(f"      - {{name: {name}, weight: {weight}, bundle: {bundle}{control}}}")
EOF
    mv "$experiments.tmp" "$experiments"
    say "experiments file -> $experiments"
fi

say "loading the world's features into Redis"
ctrserve load-features --synth "$world"
say "done"
