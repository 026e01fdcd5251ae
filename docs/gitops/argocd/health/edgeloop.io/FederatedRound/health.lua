-- Argo CD health of an edgeloop.io FederatedRound: a finite job, so Succeeded is Healthy (whether or not the
-- trained model passed the promotion gate: that is the round's result, not a fault) and Failed is Degraded; a
-- running round with a stuck pod (Degraded=True: an image that cannot be pulled, a missing Secret, a volume
-- that cannot be mounted, a crash loop) is Degraded too, with the pod's own message.
local hs = {status = "Progressing", message = "Waiting for the operator to report"}
local status = obj.status
if status == nil or status.phase == nil then
  return hs
end
if obj.metadata.generation ~= nil and status.observedGeneration ~= obj.metadata.generation then
  hs.message = "Waiting for the operator to observe generation " .. obj.metadata.generation
  return hs
end
local conditions = {}
for _, condition in ipairs(status.conditions or {}) do
  conditions[condition.type] = condition
end
local function describe(condition, fallback)
  if condition == nil then
    return fallback
  end
  local text = condition.reason or fallback
  if condition.message ~= nil and condition.message ~= "" then
    text = text .. ": " .. condition.message
  end
  return text
end
if status.phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = describe(conditions["Promoted"], status.promoted and "Promoted" or "Not promoted")
elseif status.phase == "Failed" then
  hs.status = "Degraded"
  hs.message = describe(conditions["Succeeded"], "Failed")
elseif conditions["Degraded"] ~= nil and conditions["Degraded"].status == "True" then
  hs.status = "Degraded"
  hs.message = describe(conditions["Degraded"], "Degraded")
elseif status.phase == "Running" then
  hs.message = "Round " .. (status.progress or "")
  if status.stage ~= nil and status.stage ~= "" then
    hs.message = hs.message .. ", " .. status.stage
  end
else
  hs.message = describe(conditions["Started"], "Pending")
end
return hs
