// The batches page (batchsvc/api/page.py). The API key and project id live only in this tab's
// sessionStorage; every request sends them as the API's own headers. Every refresh fetches two
// server-rendered fragments (the batches, the models) and swaps them in; lines per second are
// derived here from successive model fragments.
"use strict";

(() => {
  const STORE_KEY = "batchsvc.apiKey";
  const STORE_PROJECT = "batchsvc.projectId";
  //: Lines per second are averaged over this many seconds of readings.
  const RATE_WINDOW_S = 10;

  const config = document.body.dataset;
  const refreshMs = Number(config.refreshMs) || 2000;
  const byId = (id) => document.getElementById(id);
  const rates = new Map(); // model -> {last: {digest: done}, total, samples: [[t, total]]}
  let busy = false;

  function credentials() {
    const key = sessionStorage.getItem(STORE_KEY);
    return key ? { key, project: sessionStorage.getItem(STORE_PROJECT) || "" } : null;
  }

  function authHeaders(creds) {
    // With a project id: the API's x-api-key / x-project-id; without: the key's own project.
    return creds.project
      ? { "x-api-key": creds.key, "x-project-id": creds.project }
      : { Authorization: `Bearer ${creds.key}` };
  }

  async function call(url, creds, init = {}) {
    const response = await fetch(url, {
      ...init,
      cache: "no-store",
      headers: { ...authHeaders(creds), ...(init.headers || {}) },
    });
    if (!response.ok) {
      let message = `${response.status} ${response.statusText}`;
      try {
        const body = await response.json();
        if (body && body.error && body.error.message) message = body.error.message;
      } catch (_) {
        // not the API's error envelope: keep the status line
      }
      const error = new Error(message);
      error.status = response.status;
      throw error;
    }
    return response;
  }

  function showError(element, message) {
    element.textContent = message;
    element.hidden = !message;
  }

  function show(signedIn) {
    byId("signin").hidden = signedIn;
    byId("board").hidden = !signedIn;
    byId("forget").hidden = !signedIn;
    if (!signedIn) byId("updated").textContent = "";
  }

  function signOut(message) {
    sessionStorage.removeItem(STORE_KEY);
    sessionStorage.removeItem(STORE_PROJECT);
    rates.clear();
    byId("batches").replaceChildren();
    byId("models").replaceChildren();
    show(false);
    showError(byId("signin-error"), message || "");
    byId("api-key").focus();
  }

  function swap(element, html) {
    // Only when something changed, so a focused button or a selection survives a refresh.
    if (element.dataset.html !== html) {
      element.innerHTML = html; // rendered by the server, HTML-escaped there
      element.dataset.html = html;
      for (const time of element.querySelectorAll("time[datetime]")) {
        time.title = new Date(time.dateTime).toLocaleString();
      }
      return true;
    }
    return false;
  }

  function updateRates() {
    const now = performance.now() / 1000;
    for (const row of byId("models").querySelectorAll("tr[data-model]")) {
      const model = row.dataset.model;
      const progress = JSON.parse(row.dataset.progress || "{}");
      let state = rates.get(model);
      if (!state) {
        state = { last: progress, total: 0, samples: [[now, 0]] };
        rates.set(model, state);
      } else {
        // Lines done since the last reading, batch by batch: a batch that ended since
        // takes its lines out of the reading, and must not count as negative progress.
        for (const [digest, done] of Object.entries(progress)) {
          state.total += Math.max(0, done - (state.last[digest] || 0));
        }
        state.last = progress;
        state.samples.push([now, state.total]);
        while (state.samples.length > 2 && now - state.samples[1][0] >= RATE_WINDOW_S) {
          state.samples.shift();
        }
      }
      const [since, before] = state.samples[0];
      const cell = row.querySelector(".rate");
      cell.textContent = now - since >= 1 ? ((state.total - before) / (now - since)).toFixed(1) : "…";
    }
  }

  async function refresh() {
    const creds = credentials();
    if (!creds || busy) return;
    busy = true;
    try {
      const [batches, models] = await Promise.all([
        call(config.batchesUrl, creds).then((r) => r.text()),
        call(config.modelsUrl, creds).then((r) => r.text()),
      ]);
      if (!credentials()) return; // signed out meanwhile
      show(true);
      swap(byId("batches"), batches);
      swap(byId("models"), models);
      updateRates();
      byId("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
      showError(byId("error"), "");
    } catch (error) {
      if (error.status === 401 || error.status === 403) {
        signOut(`${error.message}: check the key and the project id.`);
      } else {
        showError(byId("error"), `Could not refresh: ${error.message}`);
      }
    } finally {
      busy = false;
    }
  }

  async function download(link) {
    const creds = credentials();
    if (!creds) return;
    try {
      const response = await call(link.href, creds);
      const url = URL.createObjectURL(await response.blob());
      const anchor = document.createElement("a");
      anchor.href = url;
      anchor.download = link.dataset.filename || `${link.dataset.fileId}.jsonl`;
      document.body.append(anchor);
      anchor.click();
      anchor.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60_000);
    } catch (error) {
      showError(byId("error"), `Could not download ${link.dataset.fileId}: ${error.message}`);
    }
  }

  async function cancel(button) {
    const creds = credentials();
    const batchId = button.dataset.cancel;
    if (!creds || !window.confirm(`Cancel batch ${batchId}?`)) return;
    button.disabled = true;
    try {
      await call(`${config.api}/batches/${encodeURIComponent(batchId)}/cancel`, creds, {
        method: "POST",
      });
    } catch (error) {
      showError(byId("error"), `Could not cancel ${batchId}: ${error.message}`);
    }
    await refresh();
  }

  byId("signin-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = byId("api-key").value.trim();
    if (!key) return;
    sessionStorage.setItem(STORE_KEY, key);
    sessionStorage.setItem(STORE_PROJECT, byId("project-id").value.trim());
    byId("api-key").value = "";
    showError(byId("signin-error"), "");
    refresh();
  });

  byId("forget").addEventListener("click", () => signOut(""));

  byId("board").addEventListener("click", (event) => {
    const link = event.target.closest("a[data-file-id]");
    if (link) {
      event.preventDefault();
      download(link);
      return;
    }
    const button = event.target.closest("button[data-cancel]");
    if (button) cancel(button);
  });

  if (credentials()) {
    refresh();
  } else {
    show(false);
  }
  setInterval(() => {
    if (!document.hidden) refresh();
  }, refreshMs);
})();
