// Starts ReDoc on /redoc from a file (the Content-Security-Policy allows no inline script).
"use strict";
(() => {
  const root = document.getElementById("redoc");
  window.Redoc.init(new URL(root.dataset.openapiUrl, window.location.href).href, { hideDownloadButton: false }, root);
})();
