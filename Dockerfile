# The images of kinfer's three components, from one multi-stage build: a static (musl)
# binary on a distroless base that has CA certificates and a nonroot user, nothing else.
#
#   docker build --build-arg COMPONENT=webhook           -t ghcr.io/kinfer/kinfer-webhook:TAG .
#   docker build --build-arg COMPONENT=autoscaler-plugin -t ghcr.io/kinfer/kinfer-autoscaler-plugin:TAG .
#   docker build --build-arg COMPONENT=pool-controller   -t ghcr.io/kinfer/kinfer-pool-controller:TAG .
#
# The HTTP wrapper's image has its own Dockerfile: build-templates/wrapper/Dockerfile.
FROM rust:1.95-alpine AS build
ARG COMPONENT
RUN test -n "$COMPONENT" || (echo "--build-arg COMPONENT=webhook|autoscaler-plugin|pool-controller" && false)
RUN apk add --no-cache musl-dev
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p "kinfer-$COMPONENT" \
    && cp "target/release/kinfer-$COMPONENT" /kinfer \
    && /kinfer --help >/dev/null

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /kinfer /kinfer
USER 65532:65532
ENTRYPOINT ["/kinfer"]
