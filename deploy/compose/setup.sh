#!/bin/sh
# Writes ./secrets (passwords, the workers' settings, Prometheus's token) for compose.yaml,
# then starts the stack. Run once, from deploy/compose.
set -eu
cd "$(dirname "$0")"
mkdir -p secrets
umask 077
secret() { head -c 24 /dev/urandom | base64 | tr -d '/+=' ; }
[ -f secrets/postgres_password ] || secret > secrets/postgres_password
[ -f secrets/worker_password ] || secret > secrets/worker_password
[ -f secrets/police_password ] || secret > secrets/police_password
cat > secrets/bikewatch.env <<ENV
BIKEWATCH_DB_URL=postgresql+asyncpg://bikewatch:$(cat secrets/postgres_password)@postgres/bikewatch
BIKEWATCH_MQTT_URL=mqtt://bikewatch:$(cat secrets/worker_password)@mosquitto:1883
ENV
: > secrets/mosquitto.passwd
docker run --rm -v "$PWD/secrets:/s" eclipse-mosquitto:2 sh -c \
  "mosquitto_passwd -b /s/mosquitto.passwd bikewatch '$(cat secrets/worker_password)' &&
   mosquitto_passwd -b /s/mosquitto.passwd police '$(cat secrets/police_password)'"
# Stations: mosquitto_passwd -b secrets/mosquitto.passwd <station id> <password>, then
# docker compose restart mosquitto.
touch secrets/ops.token
docker compose up -d --build postgres mosquitto
docker compose run --rm bikewatch token create --role ops --name "prometheus-$(date +%s)" \
  > secrets/ops.token
docker compose up -d
echo "bikewatch: http://127.0.0.1:9090 (Prometheus), http://127.0.0.1:3000 (Grafana)"
