#!/usr/bin/env bash
# deploy/viewer.sh - installs the OHIF Viewer v3 (npm package @ohif/app, its
# built site in dist/) into SITE, set up to be served by a ShardPACS router
# at /viewer/ ([http] viewer_dir = SITE) and to read the same origin's
# DICOMweb at /dicom-web.
#
#   viewer.sh SITE [--cache DIR] [--basic USER PASSWORD_FILE] [--root /dicom-web]
#
# The package tarball is fetched with `npm pack` (the registry only; no
# dependencies are installed: dist/ is already built) into --cache (default
# SITE.npm/) and reused while present. SITE is replaced. The site is built
# for the root path "/": its index.html, public path and fonts are rewritten
# for /viewer/.
#
# --basic USER PASSWORD_FILE: app-config.js adds `Authorization: Basic ...`
# with these credentials to every request the page makes to the DICOMweb
# root. FOR A LOCAL DEMO ONLY: the router serves /viewer/ without
# authentication, so anyone who can reach the port can read the credentials
# from app-config.js. OHIF's own ways in are a `?token=` on the viewer route
# (not read by the study list) or OpenID Connect (`oidc` in app-config.js).
set -euo pipefail

OHIF_VERSION=3.13.2
die() { echo "viewer: $*" >&2; exit 1; }

[[ $# -ge 1 ]] || die "usage: viewer.sh SITE [--cache DIR] [--basic USER PASSWORD_FILE] [--root /dicom-web]"
site=$1; shift
cache="" basic_user="" basic_file="" dwroot=/dicom-web
while [[ $# -gt 0 ]]; do
  case $1 in
    --cache) cache=$2; shift 2 ;;
    --basic) basic_user=$2; basic_file=$3; shift 3 ;;
    --root) dwroot=$2; shift 2 ;;
    *) die "unknown option $1" ;;
  esac
done
cache=${cache:-$site.npm}
command -v npm >/dev/null || die "npm is not installed (apt-get install npm)"

mkdir -p "$cache"
tgz="$cache/ohif-app-$OHIF_VERSION.tgz"
if [[ ! -s $tgz ]]; then
  echo "viewer: fetching @ohif/app@$OHIF_VERSION from the npm registry (about 50 MB)" >&2
  (cd "$cache" && npm pack --silent --fetch-retries=1 --fetch-retry-mintimeout=2000 \
    --fetch-retry-maxtimeout=5000 "@ohif/app@$OHIF_VERSION" >/dev/null) ||
    die "npm pack @ohif/app@$OHIF_VERSION failed"
  [[ -s $tgz ]] || die "npm pack did not produce $tgz"
fi

mkdir -p "$(dirname "$site")"
tmp=$(mktemp -d "${site%/}.tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
tar xzf "$tgz" -C "$tmp" package/dist
dist=$tmp/package/dist
[[ -f $dist/index.html ]] || die "$tgz has no dist/index.html"

# Built for "/": serve it from /viewer/ instead.
sed -i -e 's#PUBLIC_URL="/"#PUBLIC_URL="/viewer/"#' -e 's#src="/#src="/viewer/#g' \
  -e 's#href="/#href="/viewer/#g' "$dist/index.html"
grep -l '__webpack_require__.p = "/";' "$dist"/*.js | while read -r f; do
  sed -i 's#__webpack_require__.p = "/";#__webpack_require__.p = "/viewer/";#' "$f"
done
sed -i 's#url(/#url(/viewer/#g' "$dist"/*.css
[[ ! -f $dist/manifest.json ]] || sed -i 's#"/#"/viewer/#g' "$dist/manifest.json"
rm -f "$dist/sw.js" "$dist"/*.map

auth_js="null"
if [[ -n $basic_user ]]; then
  [[ -r $basic_file ]] || die "cannot read $basic_file"
  auth_js="'Basic $(printf '%s:%s' "$basic_user" "$(cat "$basic_file")" | base64 -w0)'"
fi
cat >"$dist/app-config.js" <<JS
/* ShardPACS: written by deploy/viewer.sh (OHIF $OHIF_VERSION). DICOMweb of the
   router serving this page, at $dwroot. */
(function () {
  // Demo only: credentials for the DICOMweb root, sent by every request the
  // page makes there (XMLHttpRequest and fetch). null: none.
  var auth = $auth_js;
  var root = window.location.origin + '$dwroot';
  if (!auth) return;
  var mine = function (url) {
    try { return new URL(url, window.location.href).href.indexOf(root) === 0; }
    catch (e) { return false; }
  };
  var open = XMLHttpRequest.prototype.open;
  XMLHttpRequest.prototype.open = function (method, url) {
    open.apply(this, arguments);
    if (mine(url)) this.setRequestHeader('Authorization', auth);
  };
  var fetch0 = window.fetch;
  window.fetch = function (input, init) {
    var url = typeof input === 'string' ? input : (input && input.url);
    if (mine(url)) {
      init = Object.assign({}, init || {});
      var h = new Headers(init.headers || (typeof input === 'string' ? undefined : input.headers));
      if (!h.has('Authorization')) h.set('Authorization', auth);
      init.headers = h;
    }
    return fetch0.call(this, input, init);
  };
})();

window.config = {
  routerBasename: '/viewer',
  extensions: [],
  modes: [],
  customizationService: {},
  showStudyList: true,
  investigationalUseDialog: { option: 'never' },
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: true,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  maxNumRequests: { interaction: 100, thumbnail: 5, prefetch: 25 },
  defaultDataSourceName: 'shardpacs',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'shardpacs',
      configuration: {
        friendlyName: 'ShardPACS',
        name: 'shardpacs',
        qidoRoot: '$dwroot',
        wadoRoot: '$dwroot',
        wadoUriRoot: '$dwroot',
        qidoSupportsIncludeField: true,
        supportsReject: false,
        dicomUploadEnabled: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        staticWado: false,
        singlepart: 'bulkdata,video,pdf',
        omitQuotationForMultipartRequest: true,
        bulkDataURI: { enabled: true },
      },
    },
  ],
};
JS

rm -rf "$site"
mv "$dist" "$site"
echo "viewer: OHIF $OHIF_VERSION installed in $site (serve it as [http] viewer_dir, at /viewer/)" >&2
