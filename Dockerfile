# One image for the agent, the operator and the client (`shardfarm agent|operator|…`).
# Build: docker build -t ghcr.io/shardfarm/shardfarm:0.1.0 .
FROM rust:1.91-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends libclang-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p shardfarm --bin shardfarm \
 && cp target/release/shardfarm /shardfarm

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /shardfarm /usr/local/bin/shardfarm
# Non-root (uid 65532); the agent keeps everything under --data-dir, the operator under
# --state-dir: mount volumes there, the root filesystem can stay read-only.
USER 65532:65532
EXPOSE 7398 7400 7401 9090
ENTRYPOINT ["/usr/local/bin/shardfarm"]
CMD ["--help"]
