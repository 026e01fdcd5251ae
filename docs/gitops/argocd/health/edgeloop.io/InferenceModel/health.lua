-- Argo CD health of an edgeloop.io InferenceModel, from the conditions the operator writes.
-- Healthy: Ready for the current generation; a CPU fallback (Accelerated=False, CPUFallback) stays Healthy,
-- since the model serves, and so do offline nodes (Ready reason NodesOffline: every reachable node serves; an
-- edge fleet always has some offline), and the message says so. Degraded: Degraded=True (the reason says why:
-- no matching nodes, unschedulable, a crashing runtime, a model that does not verify, a halted rollout, ...).
-- Progressing: otherwise, including until the operator has seen the current generation.
local hs = {status = "Progressing", message = "Waiting for the operator to report"}
local status = obj.status
if status == nil or status.conditions == nil then
  return hs
end
if obj.metadata.generation ~= nil and status.observedGeneration ~= obj.metadata.generation then
  hs.message = "Waiting for the operator to observe generation " .. obj.metadata.generation
  return hs
end
local conditions = {}
for _, condition in ipairs(status.conditions) do
  conditions[condition.type] = condition
end
local function describe(condition)
  local text = condition.reason or ""
  if condition.message ~= nil and condition.message ~= "" then
    text = text .. ": " .. condition.message
  end
  return text
end
local degraded, ready, progressing = conditions["Degraded"], conditions["Ready"], conditions["Progressing"]
if degraded ~= nil and degraded.status == "True" then
  hs.status = "Degraded"
  hs.message = describe(degraded)
elseif ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = "Serving on " .. (status.nodes or "") .. " nodes"
  if (status.offlineNodeCount or 0) > 0 then
    hs.message = hs.message .. ", " .. status.offlineNodeCount .. " offline (they update when they return)"
  end
  local accelerated = conditions["Accelerated"]
  if accelerated ~= nil and accelerated.reason == "CPUFallback" then
    hs.message = hs.message .. ", with a " .. describe(accelerated)
  end
elseif progressing ~= nil and progressing.status == "True" then
  hs.message = describe(progressing)
elseif ready ~= nil then
  hs.message = describe(ready)
end
return hs
