// plotly.js travels gzip-compressed and base64-encoded in #plotly-gz; inflate it with the
// browser's DecompressionStream, run it, then draw every plot from its JSON spec.
(async function () {
  const plots = Array.from(document.querySelectorAll("script[data-plot]"));
  try {
    const packed = atob(document.getElementById("plotly-gz").textContent.trim());
    const bytes = new Uint8Array(packed.length);
    for (let i = 0; i < packed.length; i++) bytes[i] = packed.charCodeAt(i);
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
    (0, eval)(await new Response(stream).text());
  } catch (err) {
    for (const div of document.querySelectorAll(".plot")) {
      div.textContent = "This browser could not unpack plotly.js (it needs DecompressionStream: " +
        "Chrome/Edge 80+, Firefox 113+, Safari 16.4+), so the plots are missing.";
      div.className = "plot empty";
    }
    throw err;
  }
  const config = JSON.parse(document.getElementById("plot-config").textContent);
  for (const spec of plots) {
    const figure = JSON.parse(spec.textContent);
    await Plotly.newPlot(spec.dataset.plot, figure.data, figure.layout, config);
  }
})();
