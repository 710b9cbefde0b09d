# One image with both services; docker-compose picks the binary with `command`.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --workspace --bins

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 ingest \
 && useradd --system --uid 10001 --gid 10001 --home /app ingest \
 && mkdir -p /var/lib/ingest/spool \
 && chown ingest:ingest /var/lib/ingest/spool
WORKDIR /app
COPY --from=build /src/target/release/collector /src/target/release/worker /src/target/release/ingestctl /usr/local/bin/
COPY schemas ./schemas
COPY config ./config
USER ingest
ENV APP_ENV=production
CMD ["collector"]
