// fleetgate console: confirmation dialogs for device actions, and live
// updates by server-sent events (the live part of a page is fetched again
// when an event concerns it). No framework, no inline script (CSP).
(function () {
  'use strict';
  var meta = document.querySelector('meta[name=csrf]');
  var csrf = meta ? meta.content : '';
  var main = document.getElementById('main');
  var status = document.getElementById('live-status');

  function say(text) { if (status) { status.textContent = text; } }

  // Fetch this page again and swap in its #live part.
  var pending = false;
  function refresh() {
    if (pending) { return; }
    pending = true;
    setTimeout(function () {
      fetch(location.href, { credentials: 'same-origin' }).then(function (r) {
        return r.text();
      }).then(function (html) {
        pending = false;
        var doc = new DOMParser().parseFromString(html, 'text/html');
        var fresh = doc.getElementById('live');
        var live = document.getElementById('live');
        if (fresh && live) { live.replaceWith(document.adoptNode(fresh)); }
      }).catch(function () { pending = false; });
    }, 150);
  }

  // Confirmation dialogs: a button opens its dialog; the dialog's form is
  // sent by fetch with the CSRF token, and the page updates live.
  document.querySelectorAll('button[data-dialog]').forEach(function (b) {
    b.addEventListener('click', function () {
      var d = document.getElementById(b.getAttribute('data-dialog'));
      d.querySelector('.error').textContent = '';
      d.showModal();
    });
  });
  document.querySelectorAll('dialog').forEach(function (d) {
    d.querySelector('[data-close]').addEventListener('click', function () { d.close(); });
    var form = d.querySelector('form');
    form.addEventListener('submit', function (ev) {
      ev.preventDefault();
      var body = new URLSearchParams(new FormData(form));
      fetch(form.action, {
        method: 'POST', body: body, credentials: 'same-origin',
        headers: { 'X-CSRF-Token': csrf }
      }).then(function (r) {
        return r.json().then(function (j) { return { ok: r.ok, j: j }; });
      }).then(function (res) {
        if (!res.ok) { d.querySelector('.error').textContent = res.j.error || 'refused'; return; }
        d.close();
        form.reset();
        say('Done: ' + form.action.split('/').pop() + ' ' + res.j.device_id + ' (state ' + res.j.state + ').');
        refresh();
      }).catch(function (e) { d.querySelector('.error').textContent = String(e); });
    });
  });

  // Live updates.
  var watch = main ? main.getAttribute('data-live') : null;
  if (!watch || !window.EventSource) { return; }
  var es = new EventSource('/events');
  es.onopen = function () { say('Live updates on.'); };
  es.onerror = function () { say('Live updates interrupted; reconnecting…'); };
  es.addEventListener('end', function () { es.close(); say('Session ended: sign in again.'); });
  es.onmessage = function (m) {
    var ev;
    try { ev = JSON.parse(m.data); } catch (e) { return; }
    var what = ev.type + (ev.device ? ' ' + ev.device : '') + (ev.state ? ' (' + ev.state + ')' : '') +
      (ev.reason ? ': ' + ev.reason : '') + (ev.count ? ' ×' + ev.count : '');
    say('Live: ' + what);
    if (watch === '*' || ev.device === watch) { refresh(); }
  };
})();
